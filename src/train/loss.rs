//! Pair losses on cosine similarity between a query set and a reference set.
//!
//! The same function serves the batch term (batch vs batch) and, later, the XBM memory term
//! (batch vs memory): self-pairs are recognised by example id, never by similarity value.
use tch::{Kind, Tensor};

use super::TrainError;

/// Margin of the contrastive loss used by XBM.
pub const DEFAULT_MARGIN: f64 = 0.5;

/// Embeddings with their labels and example ids: one side of a pair loss (the batch, or the
/// XBM memory).
#[derive(Clone, Copy)]
pub struct PairSide<'a> {
    /// `[N, D]` L2-normalised embeddings.
    pub embeddings: &'a Tensor,
    /// `[N]` labels (i64).
    pub labels: &'a Tensor,
    /// `[N]` example ids (i64); pairs with equal ids are never formed.
    pub ids: &'a Tensor,
}

impl<'a> PairSide<'a> {
    /// Groups embeddings, labels and ids.
    pub fn new(embeddings: &'a Tensor, labels: &'a Tensor, ids: &'a Tensor) -> Self {
        PairSide {
            embeddings,
            labels,
            ids,
        }
    }

    /// Checks the shapes and returns the number of rows.
    fn check(&self, what: &str) -> Result<i64, TrainError> {
        let size = self.embeddings.size();
        if size.len() != 2 {
            return Err(TrainError::Shape(format!(
                "{what} embeddings have shape {size:?}, expected [N, D]"
            )));
        }
        for (name, t) in [("labels", self.labels), ("ids", self.ids)] {
            if t.size() != [size[0]] {
                return Err(TrainError::Shape(format!(
                    "{what} {name} have shape {:?}, expected [{}]",
                    t.size(),
                    size[0]
                )));
            }
        }
        Ok(size[0])
    }
}

/// Positive (same label, other id) and negative (other label, other id) pair masks `[N, M]`.
fn pair_masks(
    query: PairSide<'_>,
    reference: PairSide<'_>,
) -> Result<(Tensor, Tensor), TrainError> {
    let same_label = query
        .labels
        .f_view([-1, 1])?
        .f_eq_tensor(&reference.labels.f_view([1, -1])?)?;
    let other_id = query
        .ids
        .f_view([-1, 1])?
        .f_ne_tensor(&reference.ids.f_view([1, -1])?)?;
    let positive = same_label.f_logical_and(&other_id)?;
    let negative = same_label.f_logical_not()?.f_logical_and(&other_id)?;
    Ok((positive, negative))
}

/// Checks both sets and returns `(number of queries, similarity [N, M], positive mask,
/// negative mask)`.
fn similarities(
    query: PairSide<'_>,
    reference: PairSide<'_>,
) -> Result<(i64, Tensor, Tensor, Tensor), TrainError> {
    let n = query.check("query")?;
    reference.check("reference")?;
    if query.embeddings.size()[1] != reference.embeddings.size()[1] {
        return Err(TrainError::Shape(format!(
            "query dimension {} differs from reference dimension {}",
            query.embeddings.size()[1],
            reference.embeddings.size()[1]
        )));
    }
    let sim = query.embeddings.f_matmul(&reference.embeddings.f_tr()?)?;
    let (positive, negative) = pair_masks(query, reference)?;
    Ok((n, sim, positive, negative))
}

/// Contrastive loss on cosine similarity `s = q · r` (rows assumed L2-normalised).
///
/// For every query (anchor) and every reference with a different example id: a positive
/// (same label) adds `1 − s`; a negative (different label) with `s > margin` adds `s`.
/// The sum is divided by the number of queries. Pairs with equal ids are ignored.
/// Returns a scalar; zero when there are no queries.
pub fn contrastive_loss(
    query: PairSide<'_>,
    reference: PairSide<'_>,
    margin: f64,
) -> Result<Tensor, TrainError> {
    let (n, sim, positive, negative) = similarities(query, reference)?;
    if n == 0 {
        return Ok(query.embeddings.f_sum(query.embeddings.kind())? * 0.0);
    }
    let positive = positive.f_to_kind(sim.kind())?;
    let hard_negative = negative
        .f_logical_and(&sim.f_gt(margin)?)?
        .f_to_kind(sim.kind())?;
    let pos = ((sim.ones_like() - &sim) * positive).f_sum(sim.kind())?;
    let neg = (&sim * hard_negative).f_sum(sim.kind())?;
    Ok((pos + neg) / n as f64)
}

/// Hyper-parameters of the multi-similarity loss (Wang et al., CVPR 2019), as used by XBM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MultiSimilarity {
    /// Similarity threshold λ.
    pub thresh: f64,
    /// Mining margin ε.
    pub margin: f64,
    /// Positive scale α.
    pub alpha: f64,
    /// Negative scale β.
    pub beta: f64,
}

impl Default for MultiSimilarity {
    fn default() -> Self {
        MultiSimilarity {
            thresh: 0.5,
            margin: 0.1,
            alpha: 2.0,
            beta: 40.0,
        }
    }
}

/// Multi-similarity loss between a query and a reference set (self-pairs masked by id).
///
/// Mining per anchor: a negative is kept if `s_n + ε > min s_p`, a positive if
/// `s_p − ε < max s_n`. Loss per anchor with at least one kept positive and one kept
/// negative: `(1/α) log(1 + Σ e^{−α(s_p − λ)}) + (1/β) log(1 + Σ e^{β(s_n − λ)})`; anchors
/// without both contribute 0. The sum is divided by the number of queries.
pub fn multi_similarity_loss(
    query: PairSide<'_>,
    reference: PairSide<'_>,
    params: MultiSimilarity,
) -> Result<Tensor, TrainError> {
    let (n, sim, positive, negative) = similarities(query, reference)?;
    if n == 0 {
        return Ok(query.embeddings.f_sum(query.embeddings.kind())? * 0.0);
    }
    let detached = sim.f_detach()?;
    let min_pos = detached
        .f_masked_fill(&positive.f_logical_not()?, f64::INFINITY)?
        .f_amin([1i64].as_slice(), true)?;
    let max_neg = detached
        .f_masked_fill(&negative.f_logical_not()?, f64::NEG_INFINITY)?
        .f_amax([1i64].as_slice(), true)?;
    let kept_neg = negative.f_logical_and(&(&detached + params.margin).f_gt_tensor(&min_pos)?)?;
    let kept_pos = positive.f_logical_and(&(&detached - params.margin).f_lt_tensor(&max_neg)?)?;
    let zeros = sim.f_zeros_like()?;
    let pos_exp = ((&sim - params.thresh) * -params.alpha)
        .f_exp()?
        .f_where_self(&kept_pos, &zeros)?;
    let neg_exp = ((&sim - params.thresh) * params.beta)
        .f_exp()?
        .f_where_self(&kept_neg, &zeros)?;
    let pos_term = (pos_exp.f_sum_dim_intlist([1i64].as_slice(), false, sim.kind())? + 1.0)
        .f_log()?
        / params.alpha;
    let neg_term = (neg_exp.f_sum_dim_intlist([1i64].as_slice(), false, sim.kind())? + 1.0)
        .f_log()?
        / params.beta;
    let has_both = kept_pos
        .f_any_dim(1, false)?
        .f_logical_and(&kept_neg.f_any_dim(1, false)?)?
        .f_to_kind(sim.kind())?;
    Ok(((pos_term + neg_term) * has_both).f_sum(sim.kind())? / n as f64)
}

/// The pair loss a trainer optimises, on batch vs batch and batch vs memory alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PairLoss {
    /// [`contrastive_loss`] with this margin.
    Contrastive {
        /// Margin on cosine similarity.
        margin: f64,
    },
    /// [`multi_similarity_loss`].
    MultiSimilarity(MultiSimilarity),
}

impl PairLoss {
    /// The loss of `query` against `reference` (self-pairs masked by id).
    pub fn compute(
        &self,
        query: PairSide<'_>,
        reference: PairSide<'_>,
    ) -> Result<Tensor, TrainError> {
        match *self {
            PairLoss::Contrastive { margin } => contrastive_loss(query, reference, margin),
            PairLoss::MultiSimilarity(params) => multi_similarity_loss(query, reference, params),
        }
    }

    /// The similarity above which a negative counts as active, for logging.
    pub fn negative_margin(&self) -> f64 {
        match *self {
            PairLoss::Contrastive { margin } => margin,
            PairLoss::MultiSimilarity(params) => params.thresh,
        }
    }
}

/// Pair counts of a query/reference set, for logging.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PairStats {
    /// Number of positive pairs (same label, different id).
    pub positives: i64,
    /// Number of negatives with similarity above the margin (the ones that get a gradient).
    pub active_negatives: i64,
    /// Mean similarity of positive pairs.
    pub mean_positive: f64,
    /// Mean similarity of negative pairs.
    pub mean_negative: f64,
}

/// Counts the pairs [`contrastive_loss`] sees (no gradients).
pub fn pair_stats(
    query: PairSide<'_>,
    reference: PairSide<'_>,
    margin: f64,
) -> Result<PairStats, TrainError> {
    query.check("query")?;
    reference.check("reference")?;
    tch::no_grad(|| {
        let sim = query.embeddings.f_matmul(&reference.embeddings.f_tr()?)?;
        let (pos, neg) = pair_masks(query, reference)?;
        let count = |m: &Tensor| m.f_sum(Kind::Int64).map(|t| t.int64_value(&[]));
        let mean = |m: &Tensor| -> Result<f64, TrainError> {
            let c = count(m)?;
            if c == 0 {
                return Ok(0.0);
            }
            let s = (&sim * m.f_to_kind(sim.kind())?).f_sum(Kind::Double)?;
            Ok(s.double_value(&[]) / c as f64)
        };
        Ok(PairStats {
            positives: count(&pos)?,
            active_negatives: count(&neg.f_logical_and(&sim.f_gt(margin)?)?)?,
            mean_positive: mean(&pos)?,
            mean_negative: mean(&neg)?,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_support::test_device;
    use rand::{Rng, SeedableRng};

    /// Plain-Rust reference: double loops over all pairs.
    fn brute_force(
        q: &[Vec<f64>],
        ql: &[i64],
        qi: &[i64],
        r: &[Vec<f64>],
        rl: &[i64],
        ri: &[i64],
        margin: f64,
    ) -> f64 {
        let mut total = 0.0;
        for a in 0..q.len() {
            for b in 0..r.len() {
                if qi[a] == ri[b] {
                    continue;
                }
                let s: f64 = q[a].iter().zip(&r[b]).map(|(x, y)| x * y).sum();
                if ql[a] == rl[b] {
                    total += 1.0 - s;
                } else if s > margin {
                    total += s;
                }
            }
        }
        total / q.len() as f64
    }

    fn unit_rows(rng: &mut rand::rngs::StdRng, n: usize, d: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|_| {
                let v: Vec<f64> = (0..d).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                v.into_iter().map(|x| x / norm).collect()
            })
            .collect()
    }

    /// Rows as an `[N, D]` f64 tensor on the device under test.
    fn tensor(rows: &[Vec<f64>]) -> Tensor {
        let flat: Vec<f64> = rows.concat();
        values(&flat).view([rows.len() as i64, -1])
    }

    /// A 1-d tensor of `v` on the device under test.
    fn values<T: tch::kind::Element>(v: &[T]) -> Tensor {
        Tensor::from_slice(v).to_device(test_device())
    }

    /// [`contrastive_loss`] on the same plain-Rust rows that [`brute_force`] takes.
    #[allow(clippy::too_many_arguments)]
    fn tensor_loss(
        q: &[Vec<f64>],
        ql: &[i64],
        qi: &[i64],
        r: &[Vec<f64>],
        rl: &[i64],
        ri: &[i64],
        margin: f64,
    ) -> f64 {
        let (qt, qlt, qit) = (tensor(q), values(ql), values(qi));
        let (rt, rlt, rit) = (tensor(r), values(rl), values(ri));
        contrastive_loss(
            PairSide::new(&qt, &qlt, &qit),
            PairSide::new(&rt, &rlt, &rit),
            margin,
        )
        .unwrap()
        .double_value(&[])
    }

    #[test]
    fn matches_brute_force_batch_vs_batch_and_vs_memory() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Low dimension so that many negatives exceed the margin.
        let q = unit_rows(&mut rng, 9, 3);
        let ql: Vec<i64> = (0..9).map(|i| i % 3).collect();
        let qi: Vec<i64> = (100..109).collect();
        // Batch vs batch: every anchor meets itself, which must be masked by id.
        let got = tensor_loss(&q, &ql, &qi, &q, &ql, &qi, 0.5);
        let want = brute_force(&q, &ql, &qi, &q, &ql, &qi, 0.5);
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");

        // Batch vs memory: the memory holds two of the batch's ids (must be masked) and a
        // genuine duplicate embedding under a new id (must count).
        let mut r = unit_rows(&mut rng, 12, 3);
        r.push(q[0].clone());
        let mut rl: Vec<i64> = (0..12).map(|i| i % 4).collect();
        rl.push(ql[0]);
        let mut ri: Vec<i64> = (0..12).collect();
        ri[3] = 102;
        ri[7] = 105;
        ri.push(999);
        let got = tensor_loss(&q, &ql, &qi, &r, &rl, &ri, 0.5);
        let want = brute_force(&q, &ql, &qi, &r, &rl, &ri, 0.5);
        assert!((got - want).abs() < 1e-10, "{got} vs {want}");
        // A genuine duplicate (same embedding, other id) is a pair; the same id is not. Value
        // masking (s < 1 − ε) would drop both.
        let one = |label: i64, id: i64| {
            contrastive_loss(
                PairSide::new(&tensor(&q[..1]), &values(&[0i64]), &values(&[5i64])),
                PairSide::new(&tensor(&q[..1]), &values(&[label]), &values(&[id])),
                0.5,
            )
            .unwrap()
            .double_value(&[])
        };
        assert!(
            (one(7, 6) - 1.0).abs() < 1e-12,
            "duplicate negative counts s = 1"
        );
        assert_eq!(one(7, 5), 0.0, "same id is masked");
        assert!(one(0, 6).abs() < 1e-12, "duplicate positive: 1 − s = 0");
    }

    #[test]
    fn hand_computed_case() {
        // Two anchors, 2-d: a = (1,0) label 0, b = (0.6,0.8) label 1, c = (0.8,0.6) label 0.
        let q = vec![vec![1.0, 0.0], vec![0.6, 0.8], vec![0.8, 0.6]];
        let l = values(&[0i64, 1, 0]);
        let ids = values(&[0i64, 1, 2]);
        // a: pos c (1 − 0.8), neg b s=0.6 > 0.5 → 0.6.  b: negs a (0.6), c (0.96).
        // c: pos a (0.2), neg b 0.96.  Total 0.2+0.6+0.6+0.96+0.2+0.96 = 3.52; / 3.
        let (labels, id_values) = ([0i64, 1, 0], [0i64, 1, 2]);
        let got = tensor_loss(&q, &labels, &id_values, &q, &labels, &id_values, 0.5);
        assert!((got - 3.52 / 3.0).abs() < 1e-12, "{got}");
        // With margin 0.7 the a–b negatives (0.6) drop out.
        let got = tensor_loss(&q, &labels, &id_values, &q, &labels, &id_values, 0.7);
        assert!((got - 2.32 / 3.0).abs() < 1e-12, "{got}");
        let stats = pair_stats(
            PairSide::new(&tensor(&q), &l, &ids),
            PairSide::new(&tensor(&q), &l, &ids),
            0.5,
        )
        .unwrap();
        assert_eq!(stats.positives, 2);
        assert_eq!(stats.active_negatives, 4);
        assert!((stats.mean_positive - 0.8).abs() < 1e-12);
        assert!((stats.mean_negative - 0.78).abs() < 1e-12);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let (n, m, d) = (5usize, 7usize, 3usize);
        let q: Vec<f64> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let r: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let ql = values(&[0i64, 1, 2, 0, 1]);
        let qi = values(&[0i64, 1, 2, 3, 4]);
        let rl = values(&[0i64, 1, 2, 0, 1, 2, 0]);
        let ri = values(&[0i64, 10, 11, 12, 4, 13, 14]);
        // Loss as a function of raw (unnormalised) query rows, normalised inside, so the
        // gradient also flows through the normalisation.
        let eval = |qv: &[f64], track: bool| {
            let qt = values(qv)
                .view([n as i64, d as i64])
                .set_requires_grad(track);
            let qn = &qt / qt.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
            let rt = values(&r).view([m as i64, d as i64]);
            let rn = &rt / rt.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
            let loss = contrastive_loss(
                PairSide::new(&qn, &ql, &qi),
                PairSide::new(&rn, &rl, &ri),
                0.5,
            )
            .unwrap();
            (qt, loss)
        };
        let (qt, loss) = eval(&q, true);
        loss.backward();
        let grad: Vec<f64> = Vec::try_from(&qt.grad().view([-1])).unwrap();
        let h = 1e-6;
        for i in 0..q.len() {
            let mut plus = q.clone();
            plus[i] += h;
            let mut minus = q.clone();
            minus[i] -= h;
            let fp = eval(&plus, false).1.double_value(&[]);
            let fm = eval(&minus, false).1.double_value(&[]);
            let fd = (fp - fm) / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-6,
                "coordinate {i}: fd {fd} vs autograd {}",
                grad[i]
            );
        }
        assert!(grad.iter().any(|g| g.abs() > 1e-3));
    }

    /// Plain-Rust multi-similarity reference (f64, loops).
    #[allow(clippy::too_many_arguments)]
    fn ms_brute_force(
        q: &[Vec<f64>],
        ql: &[i64],
        qi: &[i64],
        r: &[Vec<f64>],
        rl: &[i64],
        ri: &[i64],
        p: MultiSimilarity,
    ) -> f64 {
        let mut total = 0.0;
        for a in 0..q.len() {
            let mut pos = Vec::new();
            let mut neg = Vec::new();
            for b in 0..r.len() {
                if qi[a] == ri[b] {
                    continue;
                }
                let s: f64 = q[a].iter().zip(&r[b]).map(|(x, y)| x * y).sum();
                if ql[a] == rl[b] {
                    pos.push(s);
                } else {
                    neg.push(s);
                }
            }
            if pos.is_empty() || neg.is_empty() {
                continue;
            }
            let min_pos = pos.iter().cloned().fold(f64::INFINITY, f64::min);
            let max_neg = neg.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let kept_neg: Vec<f64> = neg
                .iter()
                .cloned()
                .filter(|s| s + p.margin > min_pos)
                .collect();
            let kept_pos: Vec<f64> = pos
                .iter()
                .cloned()
                .filter(|s| s - p.margin < max_neg)
                .collect();
            if kept_neg.is_empty() || kept_pos.is_empty() {
                continue;
            }
            let pos_sum: f64 = kept_pos
                .iter()
                .map(|s| (-p.alpha * (s - p.thresh)).exp())
                .sum();
            let neg_sum: f64 = kept_neg
                .iter()
                .map(|s| (p.beta * (s - p.thresh)).exp())
                .sum();
            total += (1.0 + pos_sum).ln() / p.alpha + (1.0 + neg_sum).ln() / p.beta;
        }
        total / q.len() as f64
    }

    #[test]
    fn multi_similarity_matches_brute_force_with_and_without_memory() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        let params = MultiSimilarity::default();
        let q = unit_rows(&mut rng, 10, 3);
        let ql: Vec<i64> = (0..10).map(|i| i % 3).collect();
        let qi: Vec<i64> = (200..210).collect();
        let loss = |r: &[Vec<f64>], rl: &[i64], ri: &[i64]| {
            PairLoss::MultiSimilarity(params)
                .compute(
                    PairSide::new(&tensor(&q), &values(&ql), &values(&qi)),
                    PairSide::new(&tensor(r), &values(rl), &values(ri)),
                )
                .unwrap()
                .double_value(&[])
        };
        let got = loss(&q, &ql, &qi);
        let want = ms_brute_force(&q, &ql, &qi, &q, &ql, &qi, params);
        assert!(want > 0.0);
        assert!((got - want).abs() < 1e-9, "batch: {got} vs {want}");
        let r = unit_rows(&mut rng, 15, 3);
        let rl: Vec<i64> = (0..15).map(|i| i % 4).collect();
        let mut ri: Vec<i64> = (0..15).collect();
        ri[2] = 203;
        let got = loss(&r, &rl, &ri);
        let want = ms_brute_force(&q, &ql, &qi, &r, &rl, &ri, params);
        assert!((got - want).abs() < 1e-9, "memory: {got} vs {want}");
    }

    #[test]
    fn multi_similarity_gradient_matches_finite_differences() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (n, m, d) = (6usize, 8usize, 3usize);
        let q: Vec<f64> = (0..n * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let r: Vec<f64> = (0..m * d).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let ql = values(&[0i64, 1, 2, 0, 1, 2]);
        let qi = values(&[0i64, 1, 2, 3, 4, 5]);
        let rl = values(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
        let ri = values(&[0i64, 10, 11, 12, 4, 13, 14, 15]);
        let eval = |qv: &[f64], track: bool| {
            let qt = values(qv)
                .view([n as i64, d as i64])
                .set_requires_grad(track);
            let qn = &qt / qt.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
            let rt = values(&r).view([m as i64, d as i64]);
            let rn = &rt / rt.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
            let loss = multi_similarity_loss(
                PairSide::new(&qn, &ql, &qi),
                PairSide::new(&rn, &rl, &ri),
                MultiSimilarity::default(),
            )
            .unwrap();
            (qt, loss)
        };
        let (qt, loss) = eval(&q, true);
        loss.backward();
        let grad: Vec<f64> = Vec::try_from(&qt.grad().view([-1])).unwrap();
        let h = 1e-6;
        for i in 0..q.len() {
            let (mut plus, mut minus) = (q.clone(), q.clone());
            plus[i] += h;
            minus[i] -= h;
            let fd = (eval(&plus, false).1.double_value(&[])
                - eval(&minus, false).1.double_value(&[]))
                / (2.0 * h);
            assert!(
                (fd - grad[i]).abs() < 1e-5,
                "coordinate {i}: fd {fd} vs autograd {}",
                grad[i]
            );
        }
        assert!(grad.iter().any(|g| g.abs() > 1e-3));
    }

    #[test]
    fn shape_errors_and_empty_query() {
        let e = Tensor::zeros([3, 4], (Kind::Float, test_device()));
        let l = values(&[0i64, 1, 2]);
        let bad = values(&[0i64, 1]);
        assert!(
            contrastive_loss(PairSide::new(&e, &l, &bad), PairSide::new(&e, &l, &l), 0.5).is_err()
        );
        let e5 = Tensor::zeros([3, 5], (Kind::Float, test_device()));
        assert!(
            contrastive_loss(PairSide::new(&e, &l, &l), PairSide::new(&e5, &l, &l), 0.5).is_err()
        );
        let empty = Tensor::zeros([0, 4], (Kind::Float, test_device()));
        let none = Tensor::zeros([0], (Kind::Int64, test_device()));
        let z = contrastive_loss(
            PairSide::new(&empty, &none, &none),
            PairSide::new(&e, &l, &l),
            0.5,
        )
        .unwrap();
        assert_eq!(z.double_value(&[]), 0.0);
    }
}
