//! PNG files with A1111's `parameters` text chunk (docs/architecture.md §4), so other tools (and a later
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
    /// img2img/inpaint strength (A1111's "Denoising strength").
    pub denoising_strength: Option<f64>,
    /// The ControlNet unit, for controlnet runs.
    pub controlnet: Option<ControlNetParameters>,
}

/// A ControlNet run's settings, written as the A1111 ControlNet extension writes a unit
/// (`ControlNet 0: "Module: canny, Model: …, Weight: 1, …"`).
#[derive(Debug, Clone, PartialEq)]
pub struct ControlNetParameters {
    /// The ControlNet (its folder, file or hub id as given).
    pub model: String,
    /// `canny` with its thresholds, or `none` (the image used as it is).
    pub canny: Option<(f32, f32)>,
    /// `controlnet_conditioning_scale`.
    pub weight: f64,
    pub guidance_start: f64,
    pub guidance_end: f64,
    pub guess_mode: bool,
}

impl ControlNetParameters {
    /// The unit's text (without the surrounding quotes).
    pub fn to_a1111(&self) -> String {
        let module = match self.canny {
            Some((low, high)) => format!("canny, Threshold A: {low}, Threshold B: {high}"),
            None => "none".into(),
        };
        // Quotes and commas would end the unit early in A1111's reader.
        let model = self.model.replace('"', "_");
        format!(
            "Module: {module}, Model: {model}, Weight: {}, Guidance Start: {}, Guidance End: {}, \
             Control Mode: {}",
            self.weight,
            self.guidance_start,
            self.guidance_end,
            if self.guess_mode {
                "ControlNet is more important"
            } else {
                "Balanced"
            }
        )
    }
}

/// Default canny thresholds when a unit names the module without them (A1111's and ours).
const CANNY_DEFAULT: (f32, f32) = (100.0, 200.0);

impl ControlNetParameters {
    /// A unit's text (without its quotes) as [`Self::to_a1111`] writes it, or as A1111's
    /// ControlNet extension (v1.1.4) does, with more keys (ignored). `Err` says why the unit
    /// cannot be used here.
    pub fn parse(unit: &str) -> std::result::Result<Self, String> {
        let pairs = parse_settings_line(unit)
            .ok_or_else(|| format!("unreadable ControlNet unit `{unit}`"))?;
        let get = |key: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        let number = |key: &str, default: f64| match get(key) {
            None => Ok(default),
            Some(v) => v
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .ok_or_else(|| format!("ControlNet {key} `{v}` is not a number")),
        };
        let canny = match get("Module").unwrap_or("none") {
            "canny" => Some((
                number("Threshold A", f64::from(CANNY_DEFAULT.0))? as f32,
                number("Threshold B", f64::from(CANNY_DEFAULT.1))? as f32,
            )),
            "none" => None,
            other => {
                return Err(format!(
                    "ControlNet module `{other}` is not available here (canny and none are)"
                ));
            }
        };
        Ok(Self {
            model: get("Model")
                .ok_or("the ControlNet unit names no model")?
                .to_string(),
            canny,
            weight: number("Weight", 1.0)?,
            guidance_start: number("Guidance Start", 0.0)?,
            guidance_end: number("Guidance End", 1.0)?,
            guess_mode: get("Control Mode") == Some("ControlNet is more important"),
        })
    }
}

impl GenerationParameters {
    /// What a PNG's `parameters` text says, for an image of `width`×`height` (its size when the
    /// text has none). A ControlNet unit that cannot be used here is left out.
    pub fn from_parsed(p: &ParsedParameters, width: usize, height: usize) -> Self {
        let (width, height) = p.size.unwrap_or((width, height));
        Self {
            prompt: p.prompt.clone(),
            negative_prompt: p.negative_prompt.clone(),
            steps: p.steps.unwrap_or(0),
            sampler: p.sampler.clone().unwrap_or_default(),
            cfg_scale: p.cfg_scale.unwrap_or(0.0),
            seed: p.seed.unwrap_or(0),
            width,
            height,
            model: p.model.clone().unwrap_or_default(),
            denoising_strength: p.denoising_strength(),
            controlnet: p.controlnet().and_then(std::result::Result::ok),
        }
    }

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
        if let Some(strength) = self.denoising_strength {
            s.push_str(&format!(", Denoising strength: {strength}"));
        }
        if let Some(unit) = &self.controlnet {
            s.push_str(&format!(", ControlNet 0: \"{}\"", unit.to_a1111()));
        }
        s
    }
}

/// What a `parameters` text says, as A1111's own reader splits it: the prompt, the negative
/// prompt, and the `Key: value, …` line (values may be quoted to hold commas). Missing keys are
/// `None`; keys Brushfire does not use are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParsedParameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: Option<usize>,
    pub sampler: Option<String>,
    pub cfg_scale: Option<f64>,
    pub seed: Option<u64>,
    pub size: Option<(usize, usize)>,
    pub model: Option<String>,
    pub extra: Vec<(String, String)>,
}

impl ParsedParameters {
    /// Parses A1111's `parameters` text (also what Brushfire writes).
    pub fn parse(text: &str) -> Self {
        let text = text.trim_end_matches(['\n', '\r']);
        let mut lines: Vec<&str> = text.lines().collect();
        let mut out = Self::default();
        // The settings line is the last line when it holds at least three `Key: value` pairs.
        if let Some(last) = lines.last()
            && let Some(pairs) = parse_settings_line(last)
        {
            lines.pop();
            for (key, value) in pairs {
                out.set(&key, value);
            }
        }
        let negative_at = lines
            .iter()
            .position(|l| l.trim_start().starts_with("Negative prompt:"));
        let (prompt_lines, negative_lines) = match negative_at {
            Some(i) => lines.split_at(i),
            None => (&lines[..], &[][..]),
        };
        out.prompt = prompt_lines.join("\n").trim().to_string();
        if let Some((first, rest)) = negative_lines.split_first() {
            let first = first
                .trim_start()
                .trim_start_matches("Negative prompt:")
                .trim_start();
            let mut negative = vec![first];
            negative.extend_from_slice(rest);
            out.negative_prompt = negative.join("\n").trim().to_string();
        }
        out
    }

    /// A value of the settings line that has no field of its own.
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// img2img/inpainting strength (`Denoising strength`), when it is a number.
    pub fn denoising_strength(&self) -> Option<f64> {
        self.setting("Denoising strength")?.parse().ok()
    }

    /// The first ControlNet unit (`ControlNet 0`), if the text has one; `Err` says why it
    /// cannot be used here.
    pub fn controlnet(&self) -> Option<std::result::Result<ControlNetParameters, String>> {
        self.setting("ControlNet 0")
            .map(ControlNetParameters::parse)
    }

    fn set(&mut self, key: &str, value: String) {
        match key {
            "Steps" => self.steps = value.parse().ok(),
            "Sampler" => self.sampler = Some(value),
            "CFG scale" => self.cfg_scale = value.parse().ok(),
            "Seed" => self.seed = value.parse().ok(),
            "Size" => {
                self.size = value
                    .split_once('x')
                    .and_then(|(w, h)| Some((w.trim().parse().ok()?, h.trim().parse().ok()?)))
            }
            "Model" => self.model = Some(value),
            _ => self.extra.push((key.to_string(), value)),
        }
    }
}

/// `Key: value, Key: "quoted, value", …` → pairs; `None` unless at least three pairs parse
/// (A1111's rule for telling the settings line from a prompt line).
fn parse_settings_line(line: &str) -> Option<Vec<(String, String)>> {
    let mut pairs = Vec::new();
    let mut rest = line.trim();
    while !rest.is_empty() {
        let colon = rest.find(':')?;
        let key = rest[..colon].trim();
        let valid_key = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_' | '/'));
        if !valid_key {
            return None;
        }
        rest = rest[colon + 1..].trim_start();
        let value;
        if let Some(quoted) = rest.strip_prefix('"') {
            // A quoted value runs to the next unescaped quote.
            let mut end = None;
            let mut escaped = false;
            for (i, c) in quoted.char_indices() {
                match c {
                    '\\' if !escaped => escaped = true,
                    '"' if !escaped => {
                        end = Some(i);
                        break;
                    }
                    _ => escaped = false,
                }
            }
            let end = end?;
            value = quoted[..end].replace("\\\"", "\"");
            rest = quoted[end + 1..].trim_start();
            rest = rest.strip_prefix(',').unwrap_or(rest).trim_start();
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = rest.get(end + 1..).unwrap_or("").trim_start();
        }
        pairs.push((key.to_string(), value));
    }
    (pairs.len() >= 3).then_some(pairs)
}

/// What became of a written PNG's `parameters` chunk. The image itself is always written when
/// [`write_png`] returns `Ok`.
#[must_use]
#[derive(Debug, Clone, PartialEq)]
pub enum Metadata {
    /// The chunk is in the file.
    Written,
    /// The chunk could not be encoded, so the image was saved without it; the text says why.
    Omitted(String),
}

impl Metadata {
    /// A line for the user when the chunk is missing, naming the file.
    pub fn warning(&self, path: &Path) -> Option<String> {
        match self {
            Self::Written => None,
            Self::Omitted(why) => Some(format!(
                "{} was saved without its generation parameters: {why}",
                path.display()
            )),
        }
    }
}

/// Writes `rgb` (`width × height × 3` bytes) as a PNG with the parameters chunk, atomically.
///
/// The chunk is `tEXt` when the text is Latin-1 and `iTXt` (UTF-8) otherwise, as A1111 (through
/// PIL) writes it, so any prompt (`a fox’s den`, `猫`, `🎨`) round-trips byte for byte. Should the
/// chunk still fail to encode, the image is written without it and [`Metadata::Omitted`] says why:
/// the picture is never lost for its metadata.
pub fn write_png(
    path: &Path,
    width: usize,
    height: usize,
    rgb: &[u8],
    params: &GenerationParameters,
) -> Result<Metadata> {
    let (bytes, metadata) = png_bytes(width, height, rgb, params)?;
    engine::tensor_io::write_atomic(path, &bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(metadata)
}

/// The bytes [`write_png`] writes, for a caller that writes them its own way (the gallery never
/// replaces a file: [`engine::atomic_file::write_atomic_new`]).
pub fn png_bytes(
    width: usize,
    height: usize,
    rgb: &[u8],
    params: &GenerationParameters,
) -> Result<(Vec<u8>, Metadata)> {
    if rgb.len() != width * height * 3 {
        bail!("image buffer of {} bytes for {width}×{height}", rgb.len());
    }
    let text = params.to_a1111();
    Ok(match encode_png(width, height, rgb, Some(&text)) {
        Ok(bytes) => (bytes, Metadata::Written),
        Err(e) => (
            encode_png(width, height, rgb, None)?,
            Metadata::Omitted(format!("{e:#}")),
        ),
    })
}

/// Whether `text` fits a `tEXt` chunk: Latin-1 (ISO 8859-1) with no NUL.
fn is_latin1(text: &str) -> bool {
    text.chars().all(|c| c != '\0' && u32::from(c) < 0x100)
}

/// The PNG file's bytes, with a `parameters` chunk holding `text` when given.
fn encode_png(width: usize, height: usize, rgb: &[u8], text: Option<&str>) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(
            BufWriter::new(&mut bytes),
            u32::try_from(width).context("width")?,
            u32::try_from(height).context("height")?,
        );
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        if let Some(text) = text {
            let (keyword, text) = ("parameters".to_string(), text.to_string());
            if is_latin1(&text) {
                encoder.add_text_chunk(keyword, text)
            } else {
                encoder.add_itxt_chunk(keyword, text)
            }
            .context("adding the parameters chunk")?;
        }
        let mut writer = encoder.write_header().context("writing the PNG header")?;
        writer.write_image_data(rgb).context("writing PNG data")?;
        writer.finish().context("finishing the PNG")?;
    }
    Ok(bytes)
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
            denoising_strength: Some(0.75),
            controlnet: Some(ControlNetParameters {
                model: "lllyasviel/sd-controlnet-canny".into(),
                canny: Some((100.0, 200.0)),
                weight: 0.8,
                guidance_start: 0.0,
                guidance_end: 0.9,
                guess_mode: false,
            }),
        };
        let rgb: Vec<u8> = (0..24).collect();
        assert_eq!(
            write_png(&path, 4, 2, &rgb, &params).unwrap(),
            Metadata::Written
        );
        let text = read_parameters_text(&path).unwrap().unwrap();
        assert_eq!(text, params.to_a1111());
        assert!(text.contains("\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 4x2"));
        let img = image::open(&path).unwrap().to_rgb8();
        assert_eq!(img.into_raw(), rgb);
        let parsed = ParsedParameters::parse(&text);
        assert_eq!(parsed.prompt, params.prompt);
        assert_eq!(parsed.negative_prompt, params.negative_prompt);
        assert_eq!(parsed.steps, Some(params.steps));
        assert_eq!(parsed.sampler.as_deref(), Some("Euler a"));
        assert_eq!(parsed.cfg_scale, Some(params.cfg_scale));
        assert_eq!(parsed.seed, Some(params.seed));
        assert_eq!(parsed.size, Some((4, 2)));
        assert_eq!(parsed.model.as_deref(), Some("tiny-sd"));
        // The ControlNet unit is one quoted value, as A1111's extension writes it.
        assert_eq!(
            parsed.setting("ControlNet 0"),
            Some(
                "Module: canny, Threshold A: 100, Threshold B: 200, Model: \
                 lllyasviel/sd-controlnet-canny, Weight: 0.8, Guidance Start: 0, Guidance End: \
                 0.9, Control Mode: Balanced"
            ),
            "{text}"
        );
        // Everything comes back, the ControlNet unit included.
        assert_eq!(GenerationParameters::from_parsed(&parsed, 1, 1), params);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Which text chunks a PNG file holds, by type, in file order.
    fn text_chunk_types(bytes: &[u8]) -> Vec<String> {
        let mut types = Vec::new();
        let mut at = 8;
        while at + 8 <= bytes.len() {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            let kind = String::from_utf8_lossy(&bytes[at + 4..at + 8]).into_owned();
            if kind.ends_with("Xt") || kind == "iTXt" {
                types.push(kind);
            }
            at += 12 + len;
        }
        types
    }

    /// Any Unicode prompt comes back byte for byte: Latin-1 text as `tEXt` (what older readers
    /// expect), anything else as `iTXt`, as A1111/PIL write them.
    #[test]
    fn unicode_prompts_round_trip_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("brushfire-png-utf8-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rgb: Vec<u8> = (0..12).collect();
        for (i, (prompt, chunk)) in [
            ("a café at dusk, naïve style", "tEXt"),
            ("a fox’s den", "iTXt"),
            ("ghibli style — castles", "iTXt"),
            ("猫, 富士山", "iTXt"),
            ("a painter’s palette 🎨", "iTXt"),
        ]
        .into_iter()
        .enumerate()
        {
            let path = dir.join(format!("{i}.png"));
            let params = GenerationParameters {
                prompt: prompt.into(),
                negative_prompt: "ugly, blurry".into(),
                steps: 2,
                sampler: "PNDM".into(),
                cfg_scale: 7.5,
                seed: 3,
                width: 2,
                height: 2,
                model: "modèles/tiny-sd".into(),
                denoising_strength: None,
                controlnet: None,
            };
            assert_eq!(
                write_png(&path, 2, 2, &rgb, &params).unwrap(),
                Metadata::Written
            );
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(
                text_chunk_types(&bytes),
                vec![chunk.to_string()],
                "{prompt}"
            );
            let text = read_parameters_text(&path).unwrap().unwrap();
            assert_eq!(text.as_bytes(), params.to_a1111().as_bytes(), "{prompt}");
            let parsed = ParsedParameters::parse(&text);
            assert_eq!(parsed.prompt, prompt);
            assert_eq!(parsed.negative_prompt, "ugly, blurry");
            assert_eq!(image::open(&path).unwrap().to_rgb8().into_raw(), rgb);
        }
        // A NUL fits no text chunk: the image is still written, and what happened is said.
        let params = GenerationParameters {
            prompt: "a\0b".into(),
            ..GenerationParameters::from_parsed(&ParsedParameters::default(), 2, 2)
        };
        let path = dir.join("nul.png");
        match write_png(&path, 2, 2, &rgb, &params).unwrap() {
            Metadata::Written => assert_eq!(
                read_parameters_text(&path).unwrap().unwrap(),
                params.to_a1111()
            ),
            omitted @ Metadata::Omitted(_) => {
                let warning = omitted.warning(&path).unwrap();
                assert!(warning.contains("nul.png"), "{warning}");
                assert_eq!(read_parameters_text(&path).unwrap(), None);
            }
        }
        assert_eq!(image::open(&path).unwrap().to_rgb8().into_raw(), rgb);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A `parameters` chunk as A1111 v1.9 writes it: multi-line prompt and negative prompt,
    /// extra keys, a quoted value holding commas and a colon, and a trailing version.
    #[test]
    fn parses_a_real_a1111_parameters_string() {
        let text = "masterpiece, best quality, (ghibli style:1.2), a fantasy landscape with castles\n\
            <lora:add_detail:0.5>, sunset\n\
            Negative prompt: lowres, bad anatomy, (worst quality:1.4)\n\
            watermark\n\
            Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 3735928559, \
            Size: 512x768, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, \
            Lora hashes: \"add_detail: 7c6bad76eb54, other: 1a2b\", Version: v1.9.4";
        let p = ParsedParameters::parse(text);
        assert_eq!(
            p.prompt,
            "masterpiece, best quality, (ghibli style:1.2), a fantasy landscape with castles\n<lora:add_detail:0.5>, sunset"
        );
        assert_eq!(
            p.negative_prompt,
            "lowres, bad anatomy, (worst quality:1.4)\nwatermark"
        );
        assert_eq!(p.steps, Some(28));
        assert_eq!(p.sampler.as_deref(), Some("DPM++ 2M"));
        assert_eq!(p.cfg_scale, Some(6.5));
        assert_eq!(p.seed, Some(3_735_928_559));
        assert_eq!(p.size, Some((512, 768)));
        assert_eq!(p.model.as_deref(), Some("v1-5-pruned-emaonly"));
        assert!(p.extra.contains(&("Schedule type".into(), "Karras".into())));
        assert!(p.extra.contains(&(
            "Lora hashes".into(),
            "add_detail: 7c6bad76eb54, other: 1a2b".into()
        )));
        assert!(p.extra.contains(&("Version".into(), "v1.9.4".into())));
    }

    #[test]
    fn reads_the_controlnet_extensions_unit() {
        // As sd-webui-controlnet v1.1.4 writes a canny unit (with keys Brushfire does not use).
        let text = "a house\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 512x512, \
            ControlNet 0: \"Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.65, \
            Resize Mode: Crop and Resize, Low Vram: False, Processor Res: 512, Threshold A: 80, \
            Threshold B: 160, Guidance Start: 0.1, Guidance End: 0.8, Pixel Perfect: False, \
            Control Mode: ControlNet is more important\", Denoising strength: 0.55";
        let p = ParsedParameters::parse(text);
        assert_eq!(p.denoising_strength(), Some(0.55));
        assert_eq!(
            p.controlnet(),
            Some(Ok(ControlNetParameters {
                model: "control_v11p_sd15_canny [d14c016b]".into(),
                canny: Some((80.0, 160.0)),
                weight: 0.65,
                guidance_start: 0.1,
                guidance_end: 0.8,
                guess_mode: true,
            }))
        );
        // A unit without thresholds or window takes the defaults; `none` is the image as it is.
        let unit = ControlNetParameters::parse("Module: none, Model: x/y, Weight: 1").unwrap();
        assert_eq!(
            (
                unit.canny,
                unit.guidance_start,
                unit.guidance_end,
                unit.guess_mode
            ),
            (None, 0.0, 1.0, false)
        );
        let unit = ControlNetParameters::parse("Module: canny, Model: x/y, Weight: 1").unwrap();
        assert_eq!(unit.canny, Some((100.0, 200.0)));
        // What cannot be used here says why.
        for (unit, why) in [
            (
                "Module: openpose, Model: x, Weight: 1",
                "ControlNet module `openpose` is not available here (canny and none are)",
            ),
            (
                "Module: canny, Weight: 1, Guidance End: 1",
                "the ControlNet unit names no model",
            ),
            (
                "Module: canny, Model: x, Weight: strong",
                "ControlNet Weight `strong` is not a number",
            ),
            ("canny", "unreadable ControlNet unit `canny`"),
        ] {
            assert_eq!(ControlNetParameters::parse(unit), Err(why.to_string()));
        }
        assert_eq!(ParsedParameters::parse("a cat").controlnet(), None);
    }

    #[test]
    fn a_prompt_without_settings_is_all_prompt() {
        let p = ParsedParameters::parse("just a prompt, with commas: and a colon");
        assert_eq!(p.prompt, "just a prompt, with commas: and a colon");
        assert_eq!(p.steps, None);
        let p = ParsedParameters::parse("a cat\nNegative prompt: a dog");
        assert_eq!(
            (p.prompt.as_str(), p.negative_prompt.as_str()),
            ("a cat", "a dog")
        );
    }
}
