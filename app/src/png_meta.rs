//! PNG files with A1111's `parameters` text chunk (DESIGN.md §4), so other tools (and a later
//! Brushfire) can read back how an image was made.

use std::io::BufWriter;
use std::path::Path;

use anyhow::{Context, Result, bail};

/// How an image was made, in A1111's vocabulary.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: String,
    pub cfg_scale: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
}

impl GenerationParameters {
    /// The `parameters` text: prompt, `Negative prompt: …`, then the settings line.
    pub fn to_a1111(&self) -> String {
        let mut s = self.prompt.clone();
        if !self.negative_prompt.is_empty() {
            s.push_str("\nNegative prompt: ");
            s.push_str(&self.negative_prompt);
        }
        s.push_str(&format!(
            "\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
            self.steps,
            self.sampler,
            self.cfg_scale,
            self.seed,
            self.width,
            self.height,
            self.model
        ));
        s
    }
}

/// Writes `rgb` (`width × height × 3` bytes) as a PNG with the parameters chunk, atomically.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    params: &GenerationParameters,
) -> Result<()> {
    if rgb.len() != width * height * 3 {
        bail!("image buffer of {} bytes for {width}×{height}", rgb.len());
    }
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(
            BufWriter::new(&mut bytes),
            u32::try_from(width).context("width")?,
            u32::try_from(height).context("height")?,
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .add_text_chunk("parameters".to_string(), params.to_a1111())
            .context("adding the parameters chunk")?;
        let mut writer = encoder.write_header().context("writing the PNG header")?;
        writer.write_image_data(rgb).context("writing PNG data")?;
        writer.finish().context("finishing the PNG")?;
    }
    engine::tensor_io::write_atomic(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))
}

/// Reads the `parameters` chunk of a PNG, if any.
pub fn read_parameters_text(path: &Path) -> Result<Option<String>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder
        .read_info()
        .with_context(|| format!("reading {}", path.display()))?;
    let info = reader.info();
    let from_t = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone());
    let from_i = info
        .utf8_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .and_then(|c| c.get_text().ok());
    let from_z = info
        .compressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .and_then(|c| c.get_text().ok());
    Ok(from_t.or(from_i).or(from_z))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_round_trip_through_a_png() {
        let dir = std::env::temp_dir().join(format!("brushfire-png-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.png");
        let params = GenerationParameters {
            prompt: "a castle, ghibli style".into(),
            negative_prompt: "blurry".into(),
            steps: 20,
            sampler: "Euler a".into(),
            cfg_scale: 7.0,
            seed: 1,
            width: 4,
            height: 2,
            model: "tiny-sd".into(),
        };
        let rgb: Vec<u8> = (0..24).collect();
        write_png(&path, 4, 2, &rgb, &params).unwrap();
        let text = read_parameters_text(&path).unwrap().unwrap();
        assert_eq!(text, params.to_a1111());
        assert!(text.contains("\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 4x2"));
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.into_raw(), rgb);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
