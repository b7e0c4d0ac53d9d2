#![cfg(unix)]
//! The bad-input battery against `brushfire generate` (docs/reliability.md): each case asserts a
//! clear message naming what is wrong, the exit code (2 bad arguments, 1 failures), no panic, no
//! backtrace, and that no output is lost. Runs on the tiny fixture with the CPU backend.
// Test code: a failed unwrap is the test failing, with its message.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

mod support;
use support::{copy_dir, fixture, png_header_only, scratch};

/// Runs `brushfire generate` on the tiny model (one 64² image, 2 steps) with `extra` flags and
/// the cache (for fallbacks) in `cache`.
fn generate(extra: &[&str], cache: &Path) -> Output {
    generate_with(extra, cache, &[])
}

fn generate_with(extra: &[&str], cache: &Path, env: &[(&str, &str)]) -> Output {
    let model = fixture("tiny-sd");
    let mut args = vec!["generate"];
    // The defaults, unless `extra` gives the flag itself.
    for (flag, value) in [
        ("--model", model.to_str().unwrap()),
        ("--prompt", "a castle"),
        ("--steps", "2"),
        ("--width", "64"),
        ("--height", "64"),
        ("--seed", "3"),
        ("--backend", "cpu"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_brushfire"));
    command
        .args(&args)
        .env("HF_HUB_OFFLINE", "1")
        .env("XDG_CACHE_HOME", cache)
        .env_remove("RUST_BACKTRACE");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("run brushfire")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The run failed with `code`, said `needles`, and neither panicked nor printed a backtrace.
fn assert_refused(output: &Output, code: i32, needles: &[&str]) {
    let text = stderr(output);
    assert_eq!(
        output.status.code(),
        Some(code),
        "exit code; stderr: {text}"
    );
    for needle in needles {
        assert!(text.contains(needle), "`{needle}` not in: {text}");
    }
    for bad in ["panicked", "stack backtrace", "Stack backtrace"] {
        assert!(!text.contains(bad), "`{bad}` in: {text}");
    }
}

/// No `.NAME.PID.N.tmp` file is left in `dir`.
fn assert_no_temporary_files(dir: &Path) {
    let left: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(
        left.is_empty(),
        "temporary files left in {}: {left:?}",
        dir.display()
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Mounts a tmpfs of `size` (e.g. `4k`) with `options` at `dir`, when allowed (root).
fn mount_tmpfs(dir: &Path, options: &str) -> bool {
    is_root()
        && Command::new("mount")
            .args(["-t", "tmpfs", "-o", options, "tmpfs"])
            .arg(dir)
            .status()
            .is_ok_and(|s| s.success())
}

fn unmount(dir: &Path) {
    let _ = Command::new("umount").arg(dir).status();
}

/// A typographic apostrophe, CJK and an emoji: each PNG's `parameters` reads back equal.
#[test]
fn unicode_prompts_are_written_and_read_back() {
    let dir = scratch("unicode");
    for (i, prompt) in [
        "a fox’s den — at dusk",
        "猫, 富士山",
        "a painter’s palette 🎨",
    ]
    .into_iter()
    .enumerate()
    {
        let png = dir.join(format!("{i}.png"));
        let output = generate(
            &[
                "--prompt",
                prompt,
                "--negative-prompt",
                "ugly — blurry",
                "--output",
                png.to_str().unwrap(),
            ],
            &dir,
        );
        assert!(output.status.success(), "{prompt}: {}", stderr(&output));
        let text = app::png_meta::read_parameters_text(&png).unwrap().unwrap();
        let parsed = app::png_meta::ParsedParameters::parse(&text);
        assert_eq!(parsed.prompt.as_bytes(), prompt.as_bytes());
        assert_eq!(parsed.negative_prompt, "ugly — blurry");
        assert_eq!(parsed.seed, Some(3));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `RUST_BACKTRACE=1` (set globally by many Rust users) still gets one clear line.
#[test]
fn a_user_error_is_one_line_without_a_backtrace() {
    let dir = scratch("backtrace");
    let model_missing = Command::new(env!("CARGO_BIN_EXE_brushfire"))
        .args(["generate", "--model", "/nonexistent", "--prompt", "x"])
        .env("RUST_BACKTRACE", "1")
        .env("HF_HUB_OFFLINE", "1")
        .env("XDG_CACHE_HOME", &dir)
        .output()
        .unwrap();
    assert_refused(&model_missing, 2, &["/nonexistent"]);
    let text = stderr(&model_missing);
    assert_eq!(text.trim().lines().count(), 1, "{text}");
    assert!(text.starts_with("error: "), "{text}");
    // A folder missing a component: named once (the reason is not repeated by the error chain).
    let no_unet = dir.join("no-unet");
    copy_dir(&fixture("tiny-sd"), &no_unet);
    std::fs::remove_dir_all(no_unet.join("unet")).unwrap();
    let missing = generate(&["--model", no_unet.to_str().unwrap()], &dir);
    let text = stderr(&missing);
    assert!(!missing.status.success(), "{text}");
    assert_eq!(
        text.matches("the `unet` component is missing").count(),
        1,
        "{text}"
    );
    assert_eq!(
        text.trim().lines().last().map(|l| l.starts_with("error: ")),
        Some(true)
    );
    // An invalid value found by the engine's request check is a bad argument too.
    let width = generate_with(&["--width", "100"], &dir, &[("RUST_BACKTRACE", "full")]);
    assert_refused(&width, 2, &["width"]);
    assert_eq!(
        stderr(&width)
            .trim()
            .lines()
            .last()
            .map(|l| l.starts_with("error: ")),
        Some(true)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Outputs that cannot be written are refused before any work, naming the path and why.
#[test]
fn unwritable_outputs_are_refused_up_front() {
    let dir = scratch("outputs");
    let missing = dir.join("no-such-folder/out.png");
    let output = generate(&["--output", missing.to_str().unwrap()], &dir);
    assert_refused(
        &output,
        2,
        &["--output", "no-such-folder", "no such folder"],
    );
    assert!(
        !stderr(&output).contains("step 1/"),
        "refused after starting work"
    );

    let folder = dir.join("a-folder.png");
    std::fs::create_dir(&folder).unwrap();
    let output = generate(&["--output", folder.to_str().unwrap()], &dir);
    assert_refused(&output, 2, &["a-folder.png", "is a folder"]);
    assert!(folder.is_dir());

    // A FIFO: writing would block forever with no reader, renaming would replace it.
    let fifo = dir.join("pipe.png");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let output = generate(&["--output", fifo.to_str().unwrap()], &dir);
    assert_refused(&output, 2, &["pipe.png", "FIFO"]);

    // A device node of our own (never a real one): refused, and still a device after.
    if is_root() {
        use std::os::unix::fs::FileTypeExt;
        let node = dir.join("null.png");
        assert!(
            Command::new("mknod")
                .arg(&node)
                .args(["c", "1", "3"])
                .status()
                .unwrap()
                .success()
        );
        let output = generate(&["--output", node.to_str().unwrap()], &dir);
        assert_refused(&output, 2, &["null.png", "character device"]);
        assert!(
            std::fs::metadata(&node)
                .unwrap()
                .file_type()
                .is_char_device()
        );
    }

    // A read-only folder: a read-only mount (root writes through a mode of 555).
    let read_only = dir.join("read-only");
    std::fs::create_dir(&read_only).unwrap();
    let mounted = mount_tmpfs(&read_only, "ro,size=64k");
    if !mounted {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&read_only, std::fs::Permissions::from_mode(0o555)).unwrap();
    }
    let target = read_only.join("out.png");
    let output = generate(&["--output", target.to_str().unwrap()], &dir);
    if mounted {
        unmount(&read_only);
    }
    assert_refused(&output, 2, &["--output", "read-only"]);
    assert_no_temporary_files(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A symlink is written through: its target gets the image and the link stays.
#[test]
fn an_output_symlink_is_written_through() {
    let dir = scratch("symlink");
    let real = dir.join("real.png");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.join("link.png");
    std::os::unix::fs::symlink("real.png", &link).unwrap();
    let output = generate(&["--output", link.to_str().unwrap()], &dir);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        std::fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink()
    );
    let img = image::open(&real).unwrap();
    assert_eq!((img.width(), img.height()), (64, 64));
    assert_no_temporary_files(&dir);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Runs `brushfire generate` with `extra` flags while a 4 KiB tmpfs is mounted at `disk`: as
/// root directly, else inside a user namespace (`unshare`). Returns the run and what the disk
/// held when it ended.
fn generate_on_full_disk(disk: &Path, extra: &[&str], cache: &Path) -> (Output, String) {
    let left = disk.with_extension("left");
    let script = r#"disk="$1"; left="$2"; shift 2
mount -t tmpfs -o size=4k tmpfs "$disk" || exit 97
"$@"; rc=$?
ls -A "$disk" > "$left"
umount "$disk" 2>/dev/null
exit $rc"#;
    let mut command = if is_root() {
        Command::new("sh")
    } else {
        let mut c = Command::new("unshare");
        c.args(["--user", "--map-root-user", "--mount", "sh"]);
        c
    };
    let model = fixture("tiny-sd");
    command
        .arg("-c")
        .arg(script)
        .arg("sh")
        .arg(disk)
        .arg(&left)
        .arg(env!("CARGO_BIN_EXE_brushfire"))
        .args(["generate", "--model"])
        .arg(&model)
        .args([
            "--prompt",
            "a castle",
            "--steps",
            "2",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "3",
            "--backend",
            "cpu",
        ])
        .args(extra)
        .env("HF_HUB_OFFLINE", "1")
        .env("XDG_CACHE_HOME", cache)
        .env_remove("RUST_BACKTRACE");
    let output = command.output().expect("run sh");
    assert_ne!(
        output.status.code(),
        Some(97),
        "cannot mount a tmpfs: the full-disk test needs root or unprivileged user namespaces"
    );
    let left = std::fs::read_to_string(&left).expect("the disk's listing");
    (output, left)
}

/// A disk that fills up during the write: no temporary file is left, the image goes to the
/// fallback folder, both places are named, and the exit code is 1. The full disk is a tiny
/// tmpfs, never a real device.
#[test]
fn a_full_disk_keeps_the_image_in_the_fallback_folder() {
    let dir = scratch("full");
    let cache = dir.join("cache");
    let disk = dir.join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    let png = disk.join("out.png");
    let (output, left) = generate_on_full_disk(&disk, &["--output", png.to_str().unwrap()], &cache);
    assert_eq!(
        left.trim(),
        "",
        "the full disk keeps a truncated image or a temporary file"
    );
    let fallback = cache.join("brushfire/unsaved/out.png");
    assert_refused(
        &output,
        1,
        &[
            "could not write",
            "out.png",
            &fallback.display().to_string(),
        ],
    );
    let img = image::open(&fallback).expect("the image is in the fallback folder");
    assert_eq!((img.width(), img.height()), (64, 64));
    let text = app::png_meta::read_parameters_text(&fallback)
        .unwrap()
        .unwrap();
    assert!(text.starts_with("a castle"), "{text}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Pictures that are not pictures, have no pixels or are too large are refused by name before
/// any work; every colour type and depth a PNG can have is read; a mask of another size than
/// its image is refused.
#[test]
fn bad_pictures_are_refused_and_unusual_ones_read() {
    let dir = scratch("pictures");
    let init = fixture("refs/init.png");
    let (w, h) = image::image_dimensions(&init).unwrap();
    let img2img = |image: &Path| {
        generate(
            &[
                "--pipeline",
                "img2img",
                "--image",
                image.to_str().unwrap(),
                "--strength",
                "0.5",
                "--output",
                dir.join("out.png").to_str().unwrap(),
            ],
            &dir,
        )
    };
    let text = dir.join("notes.png");
    std::fs::write(&text, "this is not a picture").unwrap();
    assert_refused(&img2img(&text), 2, &["notes.png", "Invalid PNG signature"]);
    let empty = dir.join("empty.png");
    std::fs::write(&empty, png_header_only(0, 0)).unwrap();
    // The PNG decoder refuses the header itself.
    assert_refused(
        &img2img(&empty),
        2,
        &["empty.png", "Invalid image dimensions"],
    );
    let huge = dir.join("huge.png");
    std::fs::write(&huge, png_header_only(20000, 20000)).unwrap();
    assert_refused(
        &img2img(&huge),
        2,
        &["huge.png", "20000×20000", "larger than"],
    );

    // 16-bit, grey, grey + alpha, RGBA and palette PNGs of the same picture all work.
    let rgb = image::open(&init).unwrap().to_rgb8();
    let sixteen = dir.join("rgb16.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .into_rgb16()
        .save(&sixteen)
        .unwrap();
    let grey = dir.join("grey.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .into_luma8()
        .save(&grey)
        .unwrap();
    let grey_alpha = dir.join("grey-alpha.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .into_luma_alpha8()
        .save(&grey_alpha)
        .unwrap();
    let rgba = dir.join("rgba.png");
    image::DynamicImage::ImageRgb8(rgb.clone())
        .into_rgba8()
        .save(&rgba)
        .unwrap();
    let palette = dir.join("palette.png");
    {
        // 216 web-safe colours; every pixel the nearest.
        let levels = [0u8, 51, 102, 153, 204, 255];
        let mut plte = Vec::new();
        for r in levels {
            for g in levels {
                for b in levels {
                    plte.extend([r, g, b]);
                }
            }
        }
        let near = |v: u8| (usize::from(v) + 25) / 51;
        let indices: Vec<u8> = rgb
            .pixels()
            .map(|p| (near(p[0]) * 36 + near(p[1]) * 6 + near(p[2])) as u8)
            .collect();
        let file = std::fs::File::create(&palette).unwrap();
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), w, h);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(plte);
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(&indices).unwrap();
    }
    for picture in [&sixteen, &grey, &grey_alpha, &rgba, &palette] {
        let output = img2img(picture);
        assert!(
            output.status.success(),
            "{}: {}",
            picture.display(),
            stderr(&output)
        );
        let out = image::open(dir.join("out.png")).unwrap();
        assert_eq!((out.width(), out.height()), (64, 64), "--width/--height 64");
    }

    // A mask of another size than its image.
    let mask = dir.join("small-mask.png");
    image::GrayImage::from_pixel(w / 2, h / 2, image::Luma([255]))
        .save(&mask)
        .unwrap();
    let output = generate(
        &[
            "--pipeline",
            "inpaint",
            "--image",
            init.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
        ],
        &dir,
    );
    assert_refused(&output, 2, &["mask"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Out-of-range numbers are refused by name before any work, with exit code 2; a prompt of
/// 100 KB (near Linux's 128 KiB limit for one argument; the engine's own test takes 1 MB) works,
/// with a warning that says how many tokens were dropped.
#[test]
fn bad_numbers_are_refused_by_name_and_a_huge_prompt_is_truncated() {
    let dir = scratch("numbers");
    for (flag, value, needle) in [
        ("--steps", "0", "steps"),
        ("--steps", "100000", "steps"),
        ("--guidance", "NaN", "guidance"),
        ("--guidance", "inf", "guidance"),
        ("--batch", "0", "batch"),
        ("--batch", "10000", "batch"),
        ("--width", "0", "width"),
        ("--height", "-64", "-64"),
        ("--width", "65", "width"),
        ("--seed", "18446744073709551616", "18446744073709551616"),
    ] {
        let output = generate(&[flag, value], &dir);
        assert_refused(&output, 2, &[needle]);
        assert!(
            !stderr(&output).contains("step 1/"),
            "{flag} {value}: work started"
        );
    }
    let init = fixture("refs/init.png");
    for strength in ["-0.1", "1.5", "NaN"] {
        let output = generate(
            &[
                "--pipeline",
                "img2img",
                "--image",
                init.to_str().unwrap(),
                "--strength",
                strength,
            ],
            &dir,
        );
        assert_refused(&output, 2, &["strength"]);
    }
    let huge: String = "a castle on a hill, ".repeat(5000);
    assert!(huge.len() >= 100_000);
    let png = dir.join("huge-prompt.png");
    let output = generate(
        &["--prompt", &huge, "--output", png.to_str().unwrap()],
        &dir,
    );
    let text = stderr(&output);
    assert!(output.status.success(), "{}", &text[..text.len().min(2000)]);
    assert!(
        text.contains("note: the prompt's last") && text.contains("tokens were dropped"),
        "{}",
        &text[..text.len().min(2000)]
    );
    assert!(
        text.len() < 10_000,
        "the warning repeats the prompt: {} bytes",
        text.len()
    );
    let saved = app::png_meta::read_parameters_text(&png).unwrap().unwrap();
    assert!(saved.starts_with(&huge), "the PNG keeps the whole prompt");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A stand-in hub on 127.0.0.1 that counts the connections made to it and closes each at once.
struct CountingHub {
    endpoint: String,
    connections: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl CountingHub {
    fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let connections = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = std::sync::Arc::clone(&connections);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                drop(stream);
            }
        });
        Self {
            endpoint,
            connections,
        }
    }

    fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Nothing is asked of the network unless a model has to be downloaded: not for a local folder,
/// not for a hub id already in the HF cache (online mode, `HF_HUB_OFFLINE` unset). A hub id that
/// is not cached does reach the (stand-in) hub, which shows the count would see a connection.
#[test]
fn no_network_unless_a_download_is_needed() {
    let dir = scratch("network");
    let hub = CountingHub::start();
    let home = dir.join("hf-home");
    let repo = home.join("hub/models--brushfire-test--tiny-sd");
    let rev = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), rev).unwrap();
    copy_dir(&fixture("tiny-sd"), &repo.join("snapshots").join(rev));
    let online = |model: &str, output: &Path| {
        generate_with(
            &["--model", model, "--output", output.to_str().unwrap()],
            &dir,
            &[
                ("HF_HUB_OFFLINE", "0"),
                ("HF_HOME", home.to_str().unwrap()),
                ("HF_ENDPOINT", &hub.endpoint),
            ],
        )
    };

    let local = online(fixture("tiny-sd").to_str().unwrap(), &dir.join("local.png"));
    assert!(local.status.success(), "{}", stderr(&local));
    let cached = online("brushfire-test/tiny-sd", &dir.join("cached.png"));
    assert!(cached.status.success(), "{}", stderr(&cached));
    assert!(dir.join("local.png").is_file() && dir.join("cached.png").is_file());
    assert_eq!(
        hub.connections(),
        0,
        "a local or cached model touched the network"
    );

    let missing = online("brushfire-test/not-cached", &dir.join("missing.png"));
    assert_refused(&missing, 1, &["brushfire-test/not-cached"]);
    assert!(
        hub.connections() > 0,
        "the stand-in hub saw no download attempt"
    );
    assert!(!dir.join("missing.png").exists());
    std::fs::remove_dir_all(&dir).unwrap();
}
