//! `crossbatch glyphs`: renders a many-class retrieval dataset (Hangul syllables × installed
//! Korean fonts) as an image folder with disjoint train and test classes.
use std::path::PathBuf;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::data::glyphs::{write_dataset_with_progress, GlyphSpec, DEBIAN_HANGUL_FONT_DIRS};

/// Arguments of `crossbatch glyphs`.
#[derive(Debug, clap::Args)]
pub struct GlyphsArgs {
    /// Output directory; `train/` and `test/` are written under it (they must not exist or be
    /// empty).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of classes (Hangul syllables, spread evenly over U+AC00..U+D7A3).
    #[arg(long, default_value_t = 2000)]
    pub classes: usize,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Directory searched recursively for .ttf/.otf/.ttc fonts; repeatable (default: the
    /// Debian Korean font directories under /usr/share/fonts/truetype that exist).
    #[arg(long = "fonts-dir")]
    pub fonts_dirs: Vec<PathBuf>,
    /// Use at most N distinct fonts (evenly spaced over the sorted usable fonts).
    #[arg(long)]
    pub max_fonts: Option<usize>,
    /// Fraction of the classes held out as unseen test classes (interleaved over the block).
    #[arg(long, default_value_t = 0.5)]
    pub test_fraction: f64,
}

/// The font directories to search: the given ones, or the Debian defaults that exist.
fn font_dirs(given: Vec<PathBuf>) -> anyhow::Result<Vec<PathBuf>> {
    if !given.is_empty() {
        return Ok(given);
    }
    let present: Vec<PathBuf> = DEBIAN_HANGUL_FONT_DIRS
        .iter()
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .collect();
    anyhow::ensure!(
        !present.is_empty(),
        "none of the default font directories exists ({}); install fonts-nanum, fonts-unfonts-core, \
         fonts-baekmuk, … or pass --fonts-dir",
        DEBIAN_HANGUL_FONT_DIRS.join(", ")
    );
    Ok(present)
}

/// Renders the dataset and prints its summary.
pub fn run(args: GlyphsArgs) -> anyhow::Result<()> {
    let mut spec = GlyphSpec::new(font_dirs(args.fonts_dirs)?, args.classes);
    spec.size = args.size;
    spec.max_fonts = args.max_fonts;

    let bar = ProgressBar::new(args.classes as u64);
    if let Ok(style) =
        ProgressStyle::with_template("{bar:40} {pos}/{len} classes  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    let started = std::time::Instant::now();
    let summary = write_dataset_with_progress(&spec, &args.out, args.test_fraction, &|| bar.inc(1))
        .with_context(|| format!("writing the glyph dataset to {}", args.out.display()))?;
    bar.finish_and_clear();

    println!("{summary}");
    for (dropped, kept) in &summary.duplicate_fonts {
        println!("  duplicate font {dropped} (identical to {kept}) dropped");
    }
    for name in &summary.fonts_without_glyphs {
        println!("  font {name} has none of the probe syllables; dropped");
    }
    for path in &summary.unreadable_fonts {
        println!("  unreadable font file {} skipped", path.display());
    }
    println!(
        "wrote {} and {} in {:.1}s",
        args.out.join("train").display(),
        args.out.join("test").display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
