//! Parity tests: every model, scheduler and pipeline of the engine against diffusers/torch
//! references made by `tests/fixtures/generate.py` (committed, so no Python is needed here).
//! One test binary, so the engine is compiled and linked into tests once.
// Test code: a failed unwrap is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod backend;
mod bench;
mod canny;
mod clip;
mod controlnet;
mod hub;
mod if_pipeline;
mod if_unets;
mod img2img_inpaint;
mod layouts;
mod memory;
mod noise;
mod schedulers;
mod session;
mod t5;
mod txt2img;
mod unet_vae;
mod upscale;
mod wgpu;
mod worker;
