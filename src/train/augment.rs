//! Data augmentation on preprocessed CHW f32 buffers: random translation (random crop from a
//! padded image) and optional horizontal flip. Deterministic for a given RNG state.
use rand::Rng;

use super::TrainError;
use crate::model::spec::InputSpec;

/// Augmentation settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Largest shift in pixels along each axis (padding of the random crop); 0 disables.
    pub max_shift: usize,
    /// Mirror horizontally with probability 1/2.
    pub flip: bool,
    /// Per-channel value written where the shifted image has no pixels (normally the
    /// normalised value of a black pixel, `−mean / std`).
    pub fill: Vec<f32>,
}

impl Augment {
    /// Augmentation for a model input: the fill is the normalised value of a black pixel.
    pub fn for_input(input: &InputSpec, max_shift: usize, flip: bool) -> Augment {
        Augment {
            max_shift,
            flip,
            fill: input
                .mean
                .iter()
                .zip(&input.std)
                .map(|(m, s)| -m / s)
                .collect(),
        }
    }

    /// Augments `n` images of shape `[c, h, w]` laid out back to back; returns a new buffer.
    pub fn apply<R: Rng>(
        &self,
        values: &[f32],
        shape: [usize; 3],
        rng: &mut R,
    ) -> Result<Vec<f32>, TrainError> {
        let numel = shape.iter().product::<usize>().max(1);
        let groups: Vec<usize> = (0..values.len() / numel).collect();
        self.apply_grouped(values, shape, &groups, rng)
    }

    /// Like [`Augment::apply`], but images with the same `groups` entry get the same random
    /// transform (a duplet's two fidelities are augmented identically).
    pub fn apply_grouped<R: Rng>(
        &self,
        values: &[f32],
        shape: [usize; 3],
        groups: &[usize],
        rng: &mut R,
    ) -> Result<Vec<f32>, TrainError> {
        let [c, h, w] = shape;
        let numel = c * h * w;
        if numel == 0
            || !values.len().is_multiple_of(numel)
            || self.fill.len() != c
            || groups.len() != values.len() / numel
        {
            return Err(TrainError::Shape(format!(
                "{} values, image shape {shape:?}, {} fill values, {} groups",
                values.len(),
                self.fill.len(),
                groups.len()
            )));
        }
        let s = self.max_shift as i64;
        let mut transforms = std::collections::HashMap::new();
        let mut out = vec![0f32; values.len()];
        for ((src, dst), group) in values
            .chunks_exact(numel)
            .zip(out.chunks_exact_mut(numel))
            .zip(groups)
        {
            let &mut (dy, dx, flip) = transforms.entry(*group).or_insert_with(|| {
                let dy = if s > 0 { rng.gen_range(-s..=s) } else { 0 };
                let dx = if s > 0 { rng.gen_range(-s..=s) } else { 0 };
                (dy, dx, self.flip && rng.gen_bool(0.5))
            });
            shift_flip(src, dst, [c, h, w], dy, dx, flip, &self.fill);
        }
        Ok(out)
    }
}

/// `dst(y, x) = src(y − dy, x' − dx)` with `x' = w − 1 − x` when flipping; `fill` outside.
fn shift_flip(
    src: &[f32],
    dst: &mut [f32],
    [c, h, w]: [usize; 3],
    dy: i64,
    dx: i64,
    flip: bool,
    fill: &[f32],
) {
    let (hi, wi) = (h as i64, w as i64);
    for (ch, &fill) in fill.iter().enumerate().take(c) {
        let plane = ch * h * w;
        for y in 0..hi {
            let sy = y - dy;
            for x in 0..wi {
                let xm = if flip { wi - 1 - x } else { x };
                let sx = xm - dx;
                let v = if (0..hi).contains(&sy) && (0..wi).contains(&sx) {
                    src[plane + (sy * wi + sx) as usize]
                } else {
                    fill
                };
                dst[plane + (y * wi + x) as usize] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn shift_and_flip_move_pixels() {
        // 1 channel, 3×4 image with a single bright pixel at (1, 0).
        let mut src = vec![0f32; 12];
        src[4] = 9.0;
        let mut dst = vec![0f32; 12];
        shift_flip(&src, &mut dst, [1, 3, 4], 1, 2, false, &[-1.0]);
        // Moves to (2, 2); the row and columns shifted in are filled with −1.
        assert_eq!(dst[2 * 4 + 2], 9.0);
        assert_eq!(dst[0], -1.0);
        assert_eq!(dst[4 + 1], -1.0);
        assert_eq!(dst[4 + 2], 0.0);
        shift_flip(&src, &mut dst, [1, 3, 4], 0, 0, true, &[-1.0]);
        assert_eq!(dst[4 + 3], 9.0, "flip mirrors column 0 to column 3");
        assert_eq!(dst.iter().filter(|v| **v != 0.0).count(), 1);
        shift_flip(&src, &mut dst, [1, 3, 4], 0, 0, false, &[-1.0]);
        assert_eq!(dst, src);
    }

    #[test]
    fn apply_is_deterministic_and_bounded() {
        let aug = Augment {
            max_shift: 2,
            flip: true,
            fill: vec![0.0, 0.0],
        };
        let values: Vec<f32> = (0..5 * 2 * 6 * 6).map(|i| i as f32 + 1.0).collect();
        let run = |seed| {
            aug.apply(
                &values,
                [2, 6, 6],
                &mut rand::rngs::StdRng::seed_from_u64(seed),
            )
            .unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        // Every output value is a source value of the same image and channel, or the fill.
        let out = run(1);
        for (img, (s, d)) in values.chunks(36).zip(out.chunks(36)).enumerate() {
            for v in d {
                assert!(
                    *v == 0.0 || s.contains(v),
                    "image {img}: {v} not from its source"
                );
            }
            // At most 2 rows and 2 columns are lost: at least 16 of 36 values survive.
            assert!(d.iter().filter(|v| **v != 0.0).count() >= 16);
        }
        let none = Augment {
            max_shift: 0,
            flip: false,
            fill: vec![0.0, 0.0],
        };
        assert_eq!(
            none.apply(
                &values,
                [2, 6, 6],
                &mut rand::rngs::StdRng::seed_from_u64(0)
            )
            .unwrap(),
            values
        );
        // Images of one group share their transform; different groups (almost surely) do not.
        let pair: Vec<f32> = values[..72].iter().chain(&values[..72]).copied().collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let shared = aug
            .apply_grouped(&pair, [2, 6, 6], &[0, 0], &mut rng)
            .unwrap();
        assert_eq!(shared[..72], shared[72..]);
        let apart: Vec<bool> = (0..8)
            .map(|seed| {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
                let out = aug
                    .apply_grouped(&pair, [2, 6, 6], &[0, 1], &mut rng)
                    .unwrap();
                out[..72] != out[72..]
            })
            .collect();
        assert!(apart.contains(&true));
        assert!(aug
            .apply(
                &values[1..],
                [2, 6, 6],
                &mut rand::rngs::StdRng::seed_from_u64(0)
            )
            .is_err());
    }
}
