//! UNets (aka diffusers' `models/unets/`).

pub mod unet_2d_blocks;
pub mod unet_2d_condition;

pub use unet_2d_condition::{
    ClassLabels, ControlResiduals, UNet2DConditionConfig, UNet2DConditionModel,
};
