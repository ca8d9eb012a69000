//! A many-class retrieval dataset rendered from installed fonts.
//!
//! Classes are characters (by default Hangul syllables spread over the 11,172-syllable block
//! U+AC00..U+D7A3); the examples of a class are the same character rendered in different fonts.
//! [`write_dataset_with_progress`] writes an image folder (`ROOT/CLASS/FONT.png`, see
//! [`crate::data::load_image_folder`]) with a `train/` and a `test/` split holding *disjoint*
//! classes — the unseen-class protocol of deep metric learning.
//!
//! Images are square, grayscale, **white glyph on a black background** (like MNIST), the
//! glyph's outline bounding box scaled to fit the square less a small margin and centred.
//! Fonts lacking a character are skipped for that class; fonts whose renderings are
//! pixel-identical to an earlier font's on a probe set of the chosen characters are dropped.
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use ab_glyph::{point, Font, FontVec, PxScale};
use image::GrayImage;

/// First Hangul syllable, U+AC00 `가`.
pub const HANGUL_FIRST: u32 = 0xAC00;
/// Number of precomposed Hangul syllables (U+AC00..=U+D7A3).
pub const HANGUL_SYLLABLES: u32 = 11_172;
/// Where Debian installs its Korean font packages (fonts-alee, fonts-baekmuk, fonts-lexi-*,
/// fonts-nanum*, fonts-unfonts-*).
pub const DEBIAN_HANGUL_FONT_DIRS: [&str; 6] = [
    "/usr/share/fonts/truetype/alee",
    "/usr/share/fonts/truetype/baekmuk",
    "/usr/share/fonts/truetype/lexi",
    "/usr/share/fonts/truetype/nanum",
    "/usr/share/fonts/truetype/unfonts-core",
    "/usr/share/fonts/truetype/unfonts-extra",
];
/// Font files (by file stem) left out because their glyphs do not match their character map:
/// Debian's `NanumGothicEcoExtraBold.ttf` (fonts-nanum-eco, 2011) draws a different syllable
/// for about 80% of the Hangul block (mean absolute difference to `NanumGothicExtraBold` of
/// 78/255 per pixel at 32 px, against at most 36 for every other Eco/regular pair), which
/// would be label noise.
pub const BROKEN_FONTS: [&str; 1] = ["NanumGothicEcoExtraBold"];
/// At most this many of the chosen characters are rendered to detect duplicate fonts.
const PROBE_CHARS: usize = 16;

/// Errors building a glyph dataset.
#[derive(Debug, thiserror::Error)]
pub enum GlyphError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// An image could not be encoded.
    #[error("{path}: {source}")]
    Image {
        /// Path being written.
        path: PathBuf,
        /// Underlying error.
        source: image::ImageError,
    },
    /// The specification is not usable (no classes, invalid code points, bad fraction…).
    #[error("invalid glyph dataset specification: {0}")]
    Spec(String),
    /// Fewer than two distinct usable fonts, so no class could have two examples.
    #[error("{0}")]
    NotEnoughFonts(String),
    /// The output split directory already exists and is not empty.
    #[error("{0}: already exists and is not empty; remove it or choose another --out")]
    OutputExists(PathBuf),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> GlyphError + '_ {
    move |source| GlyphError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What to render.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GlyphSpec {
    /// Directories searched (recursively) for `.ttf`, `.otf` and `.ttc` fonts.
    pub fonts_dirs: Vec<PathBuf>,
    /// Number of classes (characters) requested, before splitting and dropping.
    pub classes: usize,
    /// Code point of the first class (default [`HANGUL_FIRST`]).
    pub first_codepoint: u32,
    /// Distance between consecutive class code points (default [`default_stride`]).
    pub stride: u32,
    /// Side of the square images in pixels (default 32).
    pub size: u32,
    /// Use at most this many distinct fonts, chosen evenly spaced over the sorted usable fonts.
    pub max_fonts: Option<usize>,
}

impl GlyphSpec {
    /// `classes` Hangul syllables spread over the whole block, 32-pixel images, all fonts.
    pub fn new(fonts_dirs: Vec<PathBuf>, classes: usize) -> Self {
        Self {
            fonts_dirs,
            classes,
            first_codepoint: HANGUL_FIRST,
            stride: default_stride(classes),
            size: 32,
            max_fonts: None,
        }
    }

    /// The class code points, in order; errors unless every one is a valid `char`.
    pub fn codepoints(&self) -> Result<Vec<char>, GlyphError> {
        if self.classes == 0 {
            return Err(GlyphError::Spec("classes must be at least 1".into()));
        }
        if self.stride == 0 {
            return Err(GlyphError::Spec("stride must be at least 1".into()));
        }
        (0..self.classes)
            .map(|i| {
                u32::try_from(i)
                    .ok()
                    .and_then(|i| i.checked_mul(self.stride))
                    .and_then(|offset| self.first_codepoint.checked_add(offset))
                    .and_then(char::from_u32)
                    .ok_or_else(|| {
                        GlyphError::Spec(format!(
                            "class {i} (first code point U+{:04X} + {i} × stride {}) is not a valid character",
                            self.first_codepoint, self.stride
                        ))
                    })
            })
            .collect()
    }
}

/// The stride that spreads `classes` syllables evenly over the Hangul block (at least 1).
pub fn default_stride(classes: usize) -> u32 {
    let classes = u32::try_from(classes.max(1)).unwrap_or(u32::MAX);
    (HANGUL_SYLLABLES / classes).max(1)
}

/// The directory name of a class: its code point as `U+AC00`-style hex.
pub fn class_name(ch: char) -> String {
    format!("U+{:04X}", u32::from(ch))
}

/// Whether the class at `index` (in code point order) belongs to the test split: classes are
/// interleaved so that a fraction `test_fraction` of every stretch of classes is test
/// (0.5: odd indices are test, even ones train).
pub fn is_test_class(index: usize, test_fraction: f64) -> bool {
    let before = (index as f64 * test_fraction).floor();
    let after = ((index + 1) as f64 * test_fraction).floor();
    after > before
}

/// What [`write_dataset_with_progress`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GlyphSummary {
    /// Font files discovered.
    pub fonts_found: usize,
    /// Names (file names of the PNGs, without extension) of the fonts used, in order.
    pub fonts: Vec<String>,
    /// Fonts dropped as pixel-identical to an earlier one on the probe set: (dropped, kept).
    pub duplicate_fonts: Vec<(String, String)>,
    /// Fonts with none of the probe characters.
    pub fonts_without_glyphs: Vec<String>,
    /// Font files that could not be parsed.
    pub unreadable_fonts: Vec<PathBuf>,
    /// Font files left out as listed in [`BROKEN_FONTS`].
    pub broken_fonts: Vec<PathBuf>,
    /// Usable distinct fonts left out because of `max_fonts`.
    pub fonts_over_limit: usize,
    /// Classes written to `train/`.
    pub train_classes: usize,
    /// Classes written to `test/`.
    pub test_classes: usize,
    /// Images written to `train/`.
    pub train_images: usize,
    /// Images written to `test/`.
    pub test_images: usize,
    /// Requested classes not written because fewer than two fonts have the character.
    pub dropped_classes: usize,
    /// (font, character) pairs skipped because the font lacks the glyph.
    pub skipped_pairs: usize,
    /// (font, character) pairs skipped because the image is byte-identical to an earlier
    /// font's image of the same class (near-duplicate fonts such as the Nanum Eco variants).
    pub duplicate_images: usize,
}

impl GlyphSummary {
    /// Images written in both splits.
    pub fn images_written(&self) -> usize {
        self.train_images + self.test_images
    }
}

impl fmt::Display for GlyphSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "fonts: {} found, {} used, {} duplicates dropped, {} without the glyphs, {} unreadable, {} known broken, {} over --max-fonts",
            self.fonts_found,
            self.fonts.len(),
            self.duplicate_fonts.len(),
            self.fonts_without_glyphs.len(),
            self.unreadable_fonts.len(),
            self.broken_fonts.len(),
            self.fonts_over_limit
        )?;
        writeln!(
            f,
            "train: {} classes, {} images",
            self.train_classes, self.train_images
        )?;
        writeln!(
            f,
            "test:  {} classes, {} images",
            self.test_classes, self.test_images
        )?;
        write!(
            f,
            "{} images written; (font, syllable) pairs skipped: {} missing glyph, {} identical to another font's; {} classes dropped (< 2 images)",
            self.images_written(),
            self.skipped_pairs,
            self.duplicate_images,
            self.dropped_classes
        )
    }
}

fn is_font_file(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "ttf" | "otf" | "ttc"))
}

fn collect_fonts(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), GlyphError> {
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_dir() {
            collect_fonts(&path, out)?;
        } else if path.is_file() && is_font_file(&path) {
            out.push(path);
        }
    }
    Ok(())
}

/// The `.ttf`, `.otf` and `.ttc` files under `dirs` (searched recursively), sorted and without
/// repeats. A directory that cannot be read is an error.
pub fn discover_fonts(dirs: &[PathBuf]) -> Result<Vec<PathBuf>, GlyphError> {
    let mut fonts = Vec::new();
    for dir in dirs {
        collect_fonts(dir, &mut fonts)?;
    }
    fonts.sort();
    fonts.dedup();
    Ok(fonts)
}

/// Loads a font file (the first face of a collection).
pub fn load_font(path: &Path) -> Result<FontVec, GlyphError> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    FontVec::try_from_vec_and_index(bytes, 0).map_err(|e| GlyphError::Io {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, e),
    })
}

/// Renders `ch` white on black in a `size`×`size` image: the glyph's outline bounding box is
/// scaled (aspect kept) to fit the square less a margin of `max(1, size / 16)` pixels on each
/// side and centred; pixel values are the anti-aliased coverage scaled to 0..=255.
///
/// `None` when the font has no glyph for `ch` (glyph id 0), the outline is empty, or the
/// rendering has no ink.
pub fn render(font: &FontVec, ch: char, size: u32) -> Option<GrayImage> {
    let margin = (size / 16).max(1);
    let inner = size.checked_sub(2 * margin).filter(|&b| b > 0)? as f32;
    let id = font.glyph_id(ch);
    if id.0 == 0 {
        return None;
    }
    let outline = font.outline(id)?;
    if outline.curves.is_empty() {
        return None;
    }
    // ab_glyph's unscaled bounds are y-up: min = (x_min, y_max), max = (x_max, y_min).
    let (x_min, x_max) = (outline.bounds.min.x, outline.bounds.max.x);
    let (y_min, y_max) = (outline.bounds.max.y, outline.bounds.min.y);
    let (w, h) = (x_max - x_min, y_max - y_min);
    let height_unscaled = font.height_unscaled();
    if !(w > 0.0 && h > 0.0 && height_unscaled > 0.0) {
        return None;
    }
    let factor = inner / w.max(h); // pixels per font unit
    let px = factor * height_unscaled; // PxScale is pixels per (ascent - descent)
    let half = size as f32 / 2.0;
    let position = point(
        half - factor * (x_min + x_max) / 2.0,
        half + factor * (y_min + y_max) / 2.0,
    );
    let glyph = id.with_scale_and_position(PxScale { x: px, y: px }, position);
    let outlined = font.outline_glyph(glyph)?;
    let bounds = outlined.px_bounds();
    let (left, top) = (bounds.min.x as i64, bounds.min.y as i64);
    let mut image = GrayImage::new(size, size);
    let mut ink = false;
    outlined.draw(|x, y, coverage| {
        let (px, py) = (left + i64::from(x), top + i64::from(y));
        if (0..i64::from(size)).contains(&px) && (0..i64::from(size)).contains(&py) {
            let value = (coverage.clamp(0.0, 1.0) * 255.0).round() as u8;
            if value > 0 {
                ink = true;
                image.put_pixel(px as u32, py as u32, image::Luma([value]));
            }
        }
    });
    ink.then_some(image)
}

/// A file-name-safe font name: the file stem with anything but `[A-Za-z0-9._-]` replaced.
fn font_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if name.is_empty() {
        "font".into()
    } else {
        name
    }
}

/// A usable font and its unique name.
struct NamedFont {
    name: String,
    font: FontVec,
}

/// Loads, names, de-duplicates and limits the fonts; fills the font fields of `summary`.
fn select_fonts(
    spec: &GlyphSpec,
    chars: &[char],
    summary: &mut GlyphSummary,
) -> Result<Vec<NamedFont>, GlyphError> {
    let paths = discover_fonts(&spec.fonts_dirs)?;
    summary.fonts_found = paths.len();
    let probe: Vec<char> = if chars.len() <= PROBE_CHARS {
        chars.to_vec()
    } else {
        (0..PROBE_CHARS)
            .map(|i| chars[i * (chars.len() - 1) / (PROBE_CHARS - 1)])
            .collect()
    };
    let mut used_names: HashMap<String, usize> = HashMap::new();
    let mut seen: HashMap<Vec<Option<Vec<u8>>>, String> = HashMap::new();
    let mut distinct = Vec::new();
    for path in &paths {
        if path
            .file_stem()
            .and_then(|s| s.to_str())
            .is_some_and(|stem| BROKEN_FONTS.contains(&stem))
        {
            summary.broken_fonts.push(path.clone());
            continue;
        }
        let font = match load_font(path) {
            Ok(font) => font,
            Err(_) => {
                summary.unreadable_fonts.push(path.clone());
                continue;
            }
        };
        let base = font_name(path);
        let count = used_names.entry(base.clone()).or_insert(0);
        *count += 1;
        let name = if *count == 1 {
            base
        } else {
            format!("{base}-{count}")
        };
        let fingerprint: Vec<Option<Vec<u8>>> = probe
            .iter()
            .map(|&ch| render(&font, ch, spec.size).map(GrayImage::into_raw))
            .collect();
        if fingerprint.iter().all(Option::is_none) {
            summary.fonts_without_glyphs.push(name);
            continue;
        }
        if let Some(kept) = seen.get(&fingerprint) {
            summary.duplicate_fonts.push((name, kept.clone()));
            continue;
        }
        seen.insert(fingerprint, name.clone());
        distinct.push(NamedFont { name, font });
    }
    let total = distinct.len();
    let chosen: Vec<NamedFont> = match spec.max_fonts {
        Some(limit) if limit < total => {
            let wanted: Vec<usize> = (0..limit).map(|i| i * total / limit).collect();
            distinct
                .into_iter()
                .enumerate()
                .filter(|(i, _)| wanted.binary_search(i).is_ok())
                .map(|(_, f)| f)
                .collect()
        }
        _ => distinct,
    };
    summary.fonts_over_limit = total - chosen.len();
    summary.fonts = chosen.iter().map(|f| f.name.clone()).collect();
    if chosen.len() < 2 {
        return Err(GlyphError::NotEnoughFonts(format!(
            "{} distinct usable font(s) among {} file(s) in {}; at least 2 are needed",
            chosen.len(),
            paths.len(),
            spec.fonts_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    }
    Ok(chosen)
}

/// Fails unless `dir` is absent or an empty directory.
fn ensure_fresh(dir: &Path) -> Result<(), GlyphError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(GlyphError::OutputExists(dir.to_path_buf()));
            }
            Ok(())
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// Per-worker tallies.
#[derive(Default)]
struct Tally {
    train_classes: usize,
    test_classes: usize,
    train_images: usize,
    test_images: usize,
    dropped_classes: usize,
    skipped_pairs: usize,
    duplicate_images: usize,
}

fn write_png(image: &GrayImage, path: &Path) -> Result<(), GlyphError> {
    let mut bytes = Vec::new();
    image
        .write_to(&mut io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|source| GlyphError::Image {
            path: path.to_path_buf(),
            source,
        })?;
    std::fs::write(path, bytes).map_err(io_err(path))
}

/// Renders one class in every font, skips images identical to an earlier font's, and writes
/// the class when at least two images remain.
fn write_class(
    fonts: &[NamedFont],
    ch: char,
    size: u32,
    split_dir: &Path,
    test: bool,
    tally: &mut Tally,
) -> Result<(), GlyphError> {
    let mut rendered: Vec<(&str, GrayImage)> = Vec::with_capacity(fonts.len());
    for f in fonts {
        match render(&f.font, ch, size) {
            None => tally.skipped_pairs += 1,
            Some(img) if rendered.iter().any(|(_, earlier)| *earlier == img) => {
                tally.duplicate_images += 1;
            }
            Some(img) => rendered.push((f.name.as_str(), img)),
        }
    }
    if rendered.len() < 2 {
        tally.dropped_classes += 1;
        return Ok(());
    }
    let dir = split_dir.join(class_name(ch));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    for (name, image) in &rendered {
        write_png(image, &dir.join(format!("{name}.png")))?;
    }
    if test {
        tally.test_classes += 1;
        tally.test_images += rendered.len();
    } else {
        tally.train_classes += 1;
        tally.train_images += rendered.len();
    }
    Ok(())
}

/// [`write_dataset_with_progress`] without progress reporting (for tests).
#[cfg(test)]
pub fn write_dataset(
    spec: &GlyphSpec,
    out: &Path,
    test_fraction_of_classes: f64,
) -> Result<GlyphSummary, GlyphError> {
    write_dataset_with_progress(spec, out, test_fraction_of_classes, &|| {})
}

/// Writes `out/train/CLASS/FONT.png` and `out/test/CLASS/FONT.png`, CLASS being
/// [`class_name`] of the character. The splits hold disjoint classes, interleaved over the
/// code points by [`is_test_class`]. Fonts named in [`BROKEN_FONTS`] are left out; within a
/// class, an image byte-identical to an earlier font's is skipped; a class with fewer than two
/// images left is dropped.
/// The output is deterministic (independent of thread scheduling). `out/train` and `out/test`
/// must be absent or empty. `on_class` is called (from worker threads) after each requested
/// class, written or dropped.
pub fn write_dataset_with_progress(
    spec: &GlyphSpec,
    out: &Path,
    test_fraction_of_classes: f64,
    on_class: &(dyn Fn() + Sync),
) -> Result<GlyphSummary, GlyphError> {
    if !(0.0..=1.0).contains(&test_fraction_of_classes) {
        return Err(GlyphError::Spec(format!(
            "the test fraction must be within 0..=1, got {test_fraction_of_classes}"
        )));
    }
    if !(8..=1024).contains(&spec.size) {
        return Err(GlyphError::Spec(format!(
            "the image size must be within 8..=1024 pixels, got {}",
            spec.size
        )));
    }
    let chars = spec.codepoints()?;
    let (train_dir, test_dir) = (out.join("train"), out.join("test"));
    ensure_fresh(&train_dir)?;
    ensure_fresh(&test_dir)?;
    let mut summary = GlyphSummary::default();
    let fonts = select_fonts(spec, &chars, &mut summary)?;
    for dir in [&train_dir, &test_dir] {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }

    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(chars.len())
        .max(1);
    let results: Vec<Result<Tally, GlyphError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|worker| {
                let (fonts, chars, train_dir, test_dir) = (&fonts, &chars, &train_dir, &test_dir);
                scope.spawn(move || {
                    let mut tally = Tally::default();
                    for (index, &ch) in chars.iter().enumerate().skip(worker).step_by(workers) {
                        let test = is_test_class(index, test_fraction_of_classes);
                        let dir = if test { test_dir } else { train_dir };
                        write_class(fonts, ch, spec.size, dir, test, &mut tally)?;
                        on_class();
                    }
                    Ok(tally)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    });
    for result in results {
        let tally = result?;
        summary.train_classes += tally.train_classes;
        summary.test_classes += tally.test_classes;
        summary.train_images += tally.train_images;
        summary.test_images += tally.test_images;
        summary.dropped_classes += tally.dropped_classes;
        summary.skipped_pairs += tally.skipped_pairs;
        summary.duplicate_images += tally.duplicate_images;
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::present_or_skip;

    const NANUM: &str = "/usr/share/fonts/truetype/nanum";

    /// The Nanum font directory; `None` when fonts-nanum is not installed and skipping is
    /// allowed (see [`present_or_skip`]).
    fn nanum() -> Option<PathBuf> {
        let dir = PathBuf::from(NANUM);
        present_or_skip(dir.join("NanumGothic.ttf").is_file(), "fonts-nanum").then_some(dir)
    }

    fn font(dir: &Path, file: &str) -> FontVec {
        load_font(&dir.join(file)).unwrap()
    }

    /// A small font directory: three different Nanum fonts, an exact copy of one of them,
    /// an unparsable `.ttf` and a non-font file.
    fn fixture_fonts(nanum: &Path) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for file in ["NanumGothic.ttf", "NanumMyeongjo.ttf", "NanumPen.ttf"] {
            std::fs::copy(nanum.join(file), dir.path().join(file)).unwrap();
        }
        std::fs::copy(
            nanum.join("NanumGothic.ttf"),
            dir.path().join("ZGothicCopy.ttf"),
        )
        .unwrap();
        std::fs::write(dir.path().join("Broken.ttf"), b"not a font").unwrap();
        std::fs::write(dir.path().join("README"), b"x").unwrap();
        dir
    }

    /// Relative path → bytes of every file under `root`.
    fn tree(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    walk(root, &path, out);
                } else {
                    let bytes = std::fs::read(&path).unwrap();
                    out.push((path.strip_prefix(root).unwrap().to_path_buf(), bytes));
                }
            }
        }
        let mut out = Vec::new();
        walk(root, root, &mut out);
        out.sort();
        out
    }

    #[test]
    fn render_is_a_centred_nonempty_square() {
        let Some(nanum) = nanum() else { return };
        let gothic = font(&nanum, "NanumGothic.ttf");
        for size in [32, 64] {
            let img = render(&gothic, '한', size).unwrap();
            assert_eq!((img.width(), img.height()), (size, size));
            let ink: Vec<(u32, u32)> = img
                .enumerate_pixels()
                .filter(|(_, _, p)| p[0] > 0)
                .map(|(x, y, _)| (x, y))
                .collect();
            assert!(ink.len() as u32 > size * size / 10, "too little ink");
            assert!(img.pixels().any(|p| p[0] == 255), "no fully covered pixel");
            // White on black: the corners are background.
            for (x, y) in [(0, 0), (size - 1, 0), (0, size - 1), (size - 1, size - 1)] {
                assert_eq!(img.get_pixel(x, y)[0], 0);
            }
            // Fits the square less the margin (±1 px for anti-aliasing), and is centred.
            let margin = size / 16;
            let min_x = ink.iter().map(|p| p.0).min().unwrap();
            let max_x = ink.iter().map(|p| p.0).max().unwrap();
            let min_y = ink.iter().map(|p| p.1).min().unwrap();
            let max_y = ink.iter().map(|p| p.1).max().unwrap();
            assert!(min_x + 1 >= margin && min_y + 1 >= margin);
            assert!(max_x <= size - margin && max_y <= size - margin);
            // The longer side spans the box.
            let span = (max_x - min_x).max(max_y - min_y) + 1;
            assert!(span + 2 >= size - 2 * margin, "span {span} at size {size}");
            let centre = |lo: u32, hi: u32| (lo + hi) as f32 / 2.0;
            assert!((centre(min_x, max_x) - (size as f32 - 1.0) / 2.0).abs() <= 1.0);
            assert!((centre(min_y, max_y) - (size as f32 - 1.0) / 2.0).abs() <= 1.0);
        }
    }

    #[test]
    fn fonts_and_syllables_give_different_images() {
        let Some(nanum) = nanum() else { return };
        let gothic = font(&nanum, "NanumGothic.ttf");
        let myeongjo = font(&nanum, "NanumMyeongjo.ttf");
        let a = render(&gothic, '가', 32).unwrap();
        assert_ne!(a, render(&myeongjo, '가', 32).unwrap());
        assert_ne!(a, render(&gothic, '나', 32).unwrap());
        assert_eq!(a, render(&gothic, '가', 32).unwrap());
    }

    #[test]
    fn missing_glyphs_render_as_none() {
        let Some(nanum) = nanum() else { return };
        let gothic = font(&nanum, "NanumGothic.ttf");
        // Supplementary private use: no Korean font maps it.
        assert!(render(&gothic, '\u{10FFFD}', 32).is_none());
        // A space has a glyph id but no outline.
        assert!(render(&gothic, ' ', 32).is_none());
        // Too small for the margin.
        assert!(render(&gothic, '가', 2).is_none());
    }

    #[test]
    fn discover_fonts_is_sorted_recursive_and_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        for path in [
            sub.join("a.TTF"),
            dir.path().join("b.otf"),
            dir.path().join("c.ttc"),
            dir.path().join("d.txt"),
            dir.path().join("e.ttf.bak"),
        ] {
            std::fs::write(path, b"x").unwrap();
        }
        let found = discover_fonts(&[dir.path().to_path_buf()]).unwrap();
        let names: Vec<_> = found
            .iter()
            .map(|p| p.strip_prefix(dir.path()).unwrap().to_path_buf())
            .collect();
        assert_eq!(
            names,
            vec![
                PathBuf::from("b.otf"),
                PathBuf::from("c.ttc"),
                PathBuf::from("sub/a.TTF")
            ]
        );
        // The same directory twice yields each font once.
        let twice = discover_fonts(&[dir.path().to_path_buf(), dir.path().to_path_buf()]).unwrap();
        assert_eq!(twice, found);
        assert!(matches!(
            discover_fonts(&[dir.path().join("missing")]),
            Err(GlyphError::Io { .. })
        ));
    }

    #[test]
    fn classes_are_spread_and_split_interleaved() {
        let spec = GlyphSpec::new(vec![], 2000);
        assert_eq!(spec.stride, 5);
        let chars = spec.codepoints().unwrap();
        assert_eq!(chars[0], '가');
        // Integer stride: the classes span the first 89% of the block (5 × 1999 = 9995).
        assert_eq!(u32::from(chars[1999]), HANGUL_FIRST + 9995);
        assert_eq!(GlyphSpec::new(vec![], 11_172).stride, 1);
        assert_eq!(GlyphSpec::new(vec![], 50_000).stride, 1);
        assert_eq!(class_name('가'), "U+AC00");

        let tests = |n: usize, f: f64| (0..n).filter(|&i| is_test_class(i, f)).count();
        let half: Vec<bool> = (0..6).map(|i| is_test_class(i, 0.5)).collect();
        assert_eq!(half, [false, true, false, true, false, true]);
        assert_eq!(tests(100, 0.0), 0);
        assert_eq!(tests(100, 1.0), 100);
        assert_eq!(tests(100, 0.25), 25);
        assert_eq!(tests(2000, 0.3), 600);
        // Both halves cover the block: the last quarter holds train and test classes.
        assert_eq!(tests(100, 0.5) - tests(75, 0.5), 13);

        let mut bad = GlyphSpec::new(vec![], 0);
        assert!(matches!(bad.codepoints(), Err(GlyphError::Spec(_))));
        bad.classes = 3;
        bad.first_codepoint = 0xD7FF; // the next two are surrogates
        bad.stride = 1;
        let err = bad.codepoints().unwrap_err().to_string();
        assert!(err.contains("class 1"), "{err}");
    }

    #[test]
    fn write_dataset_splits_disjoint_classes_deterministically() {
        let Some(nanum) = nanum() else { return };
        let fonts = fixture_fonts(&nanum);
        let mut spec = GlyphSpec::new(vec![fonts.path().to_path_buf()], 8);
        spec.size = 24;
        let out = tempfile::tempdir().unwrap();
        let summary = write_dataset(&spec, out.path(), 0.5).unwrap();

        assert_eq!(summary.fonts_found, 5);
        assert_eq!(
            summary.fonts,
            vec!["NanumGothic", "NanumMyeongjo", "NanumPen"]
        );
        assert_eq!(
            summary.duplicate_fonts,
            vec![("ZGothicCopy".to_string(), "NanumGothic".to_string())]
        );
        assert_eq!(
            summary.unreadable_fonts,
            vec![fonts.path().join("Broken.ttf")]
        );
        assert_eq!((summary.train_classes, summary.test_classes), (4, 4));
        assert_eq!(summary.images_written(), 24);
        assert_eq!((summary.skipped_pairs, summary.dropped_classes), (0, 0));

        let classes = |split: &str| -> Vec<String> {
            let mut names: Vec<String> = std::fs::read_dir(out.path().join(split))
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            names
        };
        let (train, test) = (classes("train"), classes("test"));
        let chars = spec.codepoints().unwrap();
        let expect = |parity: usize| -> Vec<String> {
            let mut v: Vec<String> = chars
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == parity)
                .map(|(_, &c)| class_name(c))
                .collect();
            v.sort();
            v
        };
        assert_eq!(train, expect(0));
        assert_eq!(test, expect(1));
        assert!(train.iter().all(|c| !test.contains(c)));
        for (split, names) in [("train", &train), ("test", &test)] {
            for class in names {
                let dir = out.path().join(split).join(class);
                let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
                assert!(files.len() >= 2, "{}", dir.display());
                let img = image::open(dir.join("NanumPen.png")).unwrap().to_luma8();
                assert_eq!(img.dimensions(), (24, 24));
            }
        }
        // The image folder loader reads it back with one label per class.
        let ds = crate::data::load_image_folder(&out.path().join("test"), None).unwrap();
        assert_eq!(ds.len(), summary.test_images);

        // Determinism: a second run writes byte-identical files.
        let again = tempfile::tempdir().unwrap();
        assert_eq!(write_dataset(&spec, again.path(), 0.5).unwrap(), summary);
        assert_eq!(tree(out.path()), tree(again.path()));

        // Refuses to mix into an existing dataset.
        assert!(matches!(
            write_dataset(&spec, out.path(), 0.5),
            Err(GlyphError::OutputExists(_))
        ));
    }

    #[test]
    fn write_dataset_limits_fonts_and_checks_arguments() {
        let Some(nanum) = nanum() else { return };
        let fonts = fixture_fonts(&nanum);
        let mut spec = GlyphSpec::new(vec![fonts.path().to_path_buf()], 3);
        spec.size = 16;
        spec.max_fonts = Some(2);
        let out = tempfile::tempdir().unwrap();
        let summary = write_dataset(&spec, out.path(), 0.0).unwrap();
        assert_eq!(summary.fonts, vec!["NanumGothic", "NanumMyeongjo"]);
        assert_eq!(summary.fonts_over_limit, 1);
        assert_eq!((summary.train_classes, summary.test_classes), (3, 0));
        assert_eq!(summary.train_images, 6);

        spec.max_fonts = Some(1);
        let err = write_dataset(&spec, tempfile::tempdir().unwrap().path(), 0.5).unwrap_err();
        assert!(matches!(err, GlyphError::NotEnoughFonts(_)), "{err}");
        spec.max_fonts = None;
        for fraction in [-0.1, 1.5, f64::NAN] {
            let err = write_dataset(&spec, out.path(), fraction).unwrap_err();
            assert!(matches!(err, GlyphError::Spec(_)), "{err}");
        }
        spec.size = 4;
        let err = write_dataset(&spec, out.path(), 0.5).unwrap_err();
        assert!(matches!(err, GlyphError::Spec(_)), "{err}");
    }

    #[test]
    fn identical_images_within_a_class_and_broken_fonts_are_skipped() {
        let Some(nanum) = nanum() else { return };
        let dir = tempfile::tempdir().unwrap();
        // The Eco variant is pixel-identical to NanumGothic on many syllables (not all).
        for file in [
            "NanumGothic.ttf",
            "NanumGothicEco.ttf",
            "NanumPen.ttf",
            "NanumGothicEcoExtraBold.ttf",
        ] {
            std::fs::copy(nanum.join(file), dir.path().join(file)).unwrap();
        }
        let mut spec = GlyphSpec::new(vec![dir.path().to_path_buf()], 16);
        spec.size = 32;
        let out = tempfile::tempdir().unwrap();
        let summary = write_dataset(&spec, out.path(), 0.5).unwrap();
        assert_eq!(
            summary.fonts,
            vec!["NanumGothic", "NanumGothicEco", "NanumPen"]
        );
        assert_eq!(
            summary.broken_fonts,
            vec![dir.path().join("NanumGothicEcoExtraBold.ttf")]
        );
        assert!(summary.duplicate_images > 0 && summary.duplicate_images < 16);
        assert_eq!(summary.images_written() + summary.duplicate_images, 3 * 16);
        for split in ["train", "test"] {
            for class in std::fs::read_dir(out.path().join(split)).unwrap() {
                let files = tree(&class.unwrap().path());
                for (i, (_, a)) in files.iter().enumerate() {
                    assert!(files[..i].iter().all(|(_, b)| a != b));
                }
            }
        }
    }

    #[test]
    fn classes_with_fewer_than_two_fonts_are_dropped() {
        let Some(nanum) = nanum() else { return };
        let fonts = fixture_fonts(&nanum);
        // '가' (every font) then U+10FFFD (no font): the second class is dropped.
        let mut spec = GlyphSpec::new(vec![fonts.path().to_path_buf()], 2);
        spec.first_codepoint = HANGUL_FIRST;
        spec.stride = 0x10FFFD - HANGUL_FIRST;
        spec.size = 16;
        let out = tempfile::tempdir().unwrap();
        let summary = write_dataset(&spec, out.path(), 0.5).unwrap();
        assert_eq!((summary.train_classes, summary.test_classes), (1, 0));
        assert_eq!(summary.dropped_classes, 1);
        assert_eq!(summary.skipped_pairs, 3);
        assert!(out.path().join("train/U+AC00").is_dir());
        assert!(!out.path().join("test/U+10FFFD").exists());
    }
}
