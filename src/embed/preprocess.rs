//! Preprocessing: encoded image bytes or raw tensors → normalised CHW f32 values.
//!
//! Runs on plain `Vec<f32>` (no tch tensors), so request handlers can call it off the
//! inference thread.
use image::{imageops::FilterType, DynamicImage};

use crate::model::spec::InputSpec;
use crate::store::InputKind;

/// Why an input could not be turned into model input.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PreprocessError {
    /// The bytes are not a decodable PNG or JPEG image.
    #[error("not a decodable PNG or JPEG image: {0}")]
    NotAnImage(String),
    /// The image is wider or taller than [`MAX_IMAGE_SIDE`], or would take too much memory.
    #[error("image too large to decode: {0}")]
    TooLarge(String),
    /// A raw tensor's shape does not match the model input.
    #[error("tensor shape {got:?} does not match the model input shape {expected:?}")]
    WrongShape {
        /// Shape the client sent.
        got: Vec<usize>,
        /// Shape the model expects.
        expected: [usize; 3],
    },
    /// A raw tensor's value count does not match its declared shape.
    #[error("tensor has {got} values but shape {shape:?} needs {expected}")]
    WrongLength {
        /// Number of values sent.
        got: usize,
        /// Number the shape implies.
        expected: usize,
        /// Declared shape.
        shape: Vec<usize>,
    },
    /// A raw tensor contains NaN or infinity.
    #[error("tensor contains non-finite values")]
    NonFinite,
}

/// Which images a decode accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeLimit {
    /// An upload: at most [`MAX_IMAGE_SIDE`] pixels a side, checked from the header.
    Upload,
    /// A stored input, accepted once already: decoded whatever its size (the limit may have
    /// been lower, or absent, when it was stored), within the image crate's default memory
    /// cap.
    Stored,
}

/// Decodes PNG/JPEG bytes and preprocesses them for a model.
pub fn decode_image(
    bytes: &[u8],
    spec: &InputSpec,
    limit: SizeLimit,
) -> Result<Vec<f32>, PreprocessError> {
    let format =
        image::guess_format(bytes).map_err(|e| PreprocessError::NotAnImage(e.to_string()))?;
    if !matches!(format, image::ImageFormat::Png | image::ImageFormat::Jpeg) {
        return Err(PreprocessError::NotAnImage(format!(
            "unsupported format {format:?}"
        )));
    }
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(bytes), format);
    if limit == SizeLimit::Upload {
        reader.limits(upload_limits());
    }
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::Limits(_) => PreprocessError::TooLarge(e.to_string()),
        other => PreprocessError::NotAnImage(other.to_string()),
    })?;
    Ok(image_to_input(&image, spec))
}

/// The largest width and height of an image the server decodes. A PNG of a few kilobytes
/// can declare a huge canvas; refusing it before decoding bounds a request's memory and
/// resize time (a 12-megapixel photo, 4032 × 3024, still fits).
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// The most memory a decoder may allocate for one image: a `MAX_IMAGE_SIDE`² image with
/// four 16-bit channels.
const MAX_DECODE_BYTES: u64 = MAX_IMAGE_SIDE as u64 * MAX_IMAGE_SIDE as u64 * 8;

fn upload_limits() -> image::Limits {
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    limits
}

/// Converts a decoded image to the model's channels, resizes it to the model's size and
/// normalises it: `(pixel / 255 - mean[c]) / std[c]`, laid out channel-major (CHW).
pub fn image_to_input(image: &DynamicImage, spec: &InputSpec) -> Vec<f32> {
    let (w, h) = (spec.width as u32, spec.height as u32);
    let resized;
    let image = if image.width() == w && image.height() == h {
        image
    } else {
        resized = image.resize_exact(w, h, FilterType::Triangle);
        &resized
    };
    let plane = spec.height * spec.width;
    let mut out = vec![0f32; spec.numel()];
    match spec.channels {
        1 => {
            let gray = image.to_luma8();
            for (i, p) in gray.as_raw().iter().enumerate() {
                out[i] = normalise(*p, spec.mean[0], spec.std[0]);
            }
        }
        _ => {
            let rgb = image.to_rgb8();
            for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                for c in 0..3 {
                    out[c * plane + i] = normalise(px[c], spec.mean[c], spec.std[c]);
                }
            }
        }
    }
    out
}

/// Validates a raw tensor sent by a client (`values` in CHW order, already normalised).
pub fn check_tensor(
    values: Vec<f32>,
    shape: &[usize],
    spec: &InputSpec,
) -> Result<Vec<f32>, PreprocessError> {
    let expected = spec.shape();
    if shape != expected {
        return Err(PreprocessError::WrongShape {
            got: shape.to_vec(),
            expected,
        });
    }
    if values.len() != spec.numel() {
        return Err(PreprocessError::WrongLength {
            got: values.len(),
            expected: spec.numel(),
            shape: shape.to_vec(),
        });
    }
    if values.iter().any(|v| !v.is_finite()) {
        return Err(PreprocessError::NonFinite);
    }
    Ok(values)
}

/// Recreates model input values from an input as the store keeps it (image file bytes, or a
/// tensor as f32 little-endian), for re-embedding with another model.
pub fn values_from_raw(
    raw: &[u8],
    kind: &InputKind,
    spec: &InputSpec,
) -> Result<Vec<f32>, PreprocessError> {
    match kind {
        InputKind::Image => decode_image(raw, spec, SizeLimit::Stored),
        InputKind::Tensor { shape } => {
            let values = raw
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            check_tensor(values, shape, spec)
        }
    }
}

fn normalise(pixel: u8, mean: f32, std: f32) -> f32 {
    (pixel as f32 / 255.0 - mean) / std
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::model::spec::gray_test_spec as gray_spec;

    fn png_bytes(image: &DynamicImage) -> Vec<u8> {
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn gray_png_round_trips_with_normalisation() {
        let pixels: Vec<u8> = (0..16u8).map(|i| i * 17).collect();
        let image =
            DynamicImage::ImageLuma8(image::GrayImage::from_raw(4, 4, pixels.clone()).unwrap());
        let input = decode_image(&png_bytes(&image), &gray_spec(4), SizeLimit::Upload).unwrap();
        for (value, pixel) in input.iter().zip(&pixels) {
            let expected = (*pixel as f32 / 255.0 - 0.5) / 0.25;
            assert!((value - expected).abs() < 1e-6, "{value} vs {expected}");
        }
    }

    #[test]
    fn uploads_over_the_size_limit_are_refused_from_the_header_and_stored_inputs_are_not() {
        let decode =
            |image: &DynamicImage, limit| decode_image(&png_bytes(image), &gray_spec(4), limit);
        let at_limit = DynamicImage::ImageLuma8(image::GrayImage::new(MAX_IMAGE_SIDE, 1));
        assert!(decode(&at_limit, SizeLimit::Upload).is_ok());
        for (w, h) in [(MAX_IMAGE_SIDE + 1, 1), (1, MAX_IMAGE_SIDE + 1)] {
            let over = DynamicImage::ImageLuma8(image::GrayImage::new(w, h));
            let error = decode(&over, SizeLimit::Upload).unwrap_err();
            assert!(
                matches!(error, PreprocessError::TooLarge(_)),
                "{w}×{h}: {error:?}"
            );
            assert!(decode(&over, SizeLimit::Stored).is_ok(), "stored {w}×{h}");
        }
        // Only a header declaring 100,000 × 100,000 pixels, and nothing after it: refused
        // as too large (a decode attempt would report the missing data instead).
        let mut png = png_bytes(&DynamicImage::ImageLuma8(image::GrayImage::new(1, 1)));
        png[16..20].copy_from_slice(&100_000u32.to_be_bytes());
        png[20..24].copy_from_slice(&100_000u32.to_be_bytes());
        let mut crc = flate2::Crc::new();
        crc.update(&png[12..29]);
        png[29..33].copy_from_slice(&crc.sum().to_be_bytes());
        png.truncate(33);
        let error = decode_image(&png, &gray_spec(4), SizeLimit::Upload).unwrap_err();
        assert!(matches!(error, PreprocessError::TooLarge(_)), "{error:?}");
    }

    #[test]
    fn rgb_is_laid_out_channel_major() {
        let mut rgb = image::RgbImage::new(2, 1);
        rgb.put_pixel(0, 0, image::Rgb([255, 0, 0]));
        rgb.put_pixel(1, 0, image::Rgb([0, 255, 0]));
        let spec = InputSpec {
            channels: 3,
            height: 1,
            width: 2,
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        };
        let input = decode_image(
            &png_bytes(&DynamicImage::ImageRgb8(rgb)),
            &spec,
            SizeLimit::Upload,
        )
        .unwrap();
        assert_eq!(input, vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
    }

    #[test]
    fn rgb_to_gray_and_resize() {
        let rgb = image::RgbImage::from_pixel(8, 6, image::Rgb([200, 200, 200]));
        let input = decode_image(
            &png_bytes(&DynamicImage::ImageRgb8(rgb)),
            &gray_spec(4),
            SizeLimit::Upload,
        )
        .unwrap();
        assert_eq!(input.len(), 16);
        let expected = (200.0 / 255.0 - 0.5) / 0.25;
        assert!(input.iter().all(|v| (v - expected).abs() < 1e-2));
    }

    #[test]
    fn garbage_bytes_are_rejected() {
        assert!(matches!(
            decode_image(b"hello world", &gray_spec(4), SizeLimit::Upload),
            Err(PreprocessError::NotAnImage(_))
        ));
        let mut truncated = png_bytes(&DynamicImage::ImageLuma8(image::GrayImage::new(4, 4)));
        truncated.truncate(20);
        assert!(matches!(
            decode_image(&truncated, &gray_spec(4), SizeLimit::Upload),
            Err(PreprocessError::NotAnImage(_))
        ));
    }

    #[test]
    fn raw_inputs_round_trip() {
        let spec = gray_spec(2);
        let values = vec![0.5f32, -1.0, 2.0, 0.0];
        let raw: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let kind = InputKind::Tensor {
            shape: vec![1, 2, 2],
        };
        assert_eq!(values_from_raw(&raw, &kind, &spec).unwrap(), values);
        let png = png_bytes(&DynamicImage::ImageLuma8(image::GrayImage::new(2, 2)));
        assert_eq!(
            values_from_raw(&png, &InputKind::Image, &spec).unwrap(),
            decode_image(&png, &spec, SizeLimit::Upload).unwrap()
        );
        assert!(values_from_raw(&raw[..8], &kind, &spec).is_err());
    }

    #[test]
    fn tensors_are_checked() {
        let spec = gray_spec(2);
        assert!(check_tensor(vec![0.0; 4], &[1, 2, 2], &spec).is_ok());
        assert!(matches!(
            check_tensor(vec![0.0; 4], &[2, 2], &spec),
            Err(PreprocessError::WrongShape { .. })
        ));
        assert!(matches!(
            check_tensor(vec![0.0; 3], &[1, 2, 2], &spec),
            Err(PreprocessError::WrongLength { .. })
        ));
        assert_eq!(
            check_tensor(vec![f32::NAN, 0.0, 0.0, 0.0], &[1, 2, 2], &spec),
            Err(PreprocessError::NonFinite)
        );
    }
}
