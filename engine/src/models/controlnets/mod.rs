//! ControlNets (aka diffusers' `models/controlnets/`).

pub mod controlnet;

pub use controlnet::{ControlNetConfig, ControlNetModel};
