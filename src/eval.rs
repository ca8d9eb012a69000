//! Exact leave-one-out retrieval metrics: Recall@1/2/4/8 and MAP@R.
//!
//! Every item is a query against all the others (itself excluded). Neighbours are ranked by
//! cosine similarity, descending; equal similarities are ordered by item index, ascending,
//! so results are deterministic. The similarity matrix is computed in row chunks with tch.
use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

/// The k of the reported Recall@k.
pub const RECALL_KS: [usize; 4] = [1, 2, 4, 8];

/// Upper bound on the number of similarity values held at once (per chunk).
const CHUNK_ELEMENTS: usize = 1 << 24;

/// Retrieval quality of a set of labelled embeddings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Number of items (each is a query).
    pub n: usize,
    /// Recall@k keyed by k (`"1"`, `"2"`, `"4"`, `"8"`): fraction of queries with at least one
    /// same-label item among their k nearest other items.
    pub recall_at: BTreeMap<String, f64>,
    /// MAP@R (Musgrave et al. 2020), over queries with at least one other same-label item.
    pub map_at_r: f64,
}

/// Errors computing metrics.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The inputs cannot be evaluated.
    #[error("{0}")]
    Input(String),
    /// libtorch reported an error.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Calls `visit(q, ranking)` for each row `q` of `embeddings` (`[N, D]`, N ≥ 2, compared by
/// cosine similarity) with the indices of its `depth` (≤ N − 1) nearest other rows, most
/// similar first, ties to the lower index. Exact; the similarity matrix is computed a chunk
/// of rows at a time, so memory stays bounded for any N.
pub fn for_each_ranking(
    embeddings: &Tensor,
    depth: usize,
    mut visit: impl FnMut(usize, &[i64]),
) -> Result<(), EvalError> {
    let n = embeddings.size().first().copied().unwrap_or(0) as usize;
    let emb = tch::no_grad(|| -> Result<Tensor, EvalError> {
        let x = embeddings
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?;
        let norm = x
            .f_norm_scalaropt_dim(2.0, [1i64].as_slice(), true)?
            .f_clamp_min(1e-12)?;
        Ok(x.f_div(&norm)?)
    })?;
    let emb_t = emb.f_tr()?;
    let chunk = (CHUNK_ELEMENTS / n.max(1)).clamp(1, n.max(1));
    let mut start = 0;
    while start < n {
        let rows = chunk.min(n - start);
        let neighbours = tch::no_grad(|| -> Result<Vec<i64>, EvalError> {
            let q = emb.f_narrow(0, start as i64, rows as i64)?;
            let sim = q.f_matmul(&emb_t)?;
            // Exclude the query itself: put it below every real similarity (≥ −1).
            let self_index = Tensor::f_arange_start(
                start as i64,
                (start + rows) as i64,
                (Kind::Int64, Device::Cpu),
            )?
            .f_view([-1, 1])?;
            let sim = sim.f_scatter_value(1, &self_index, f64::NEG_INFINITY)?;
            let (_, order) = sim.f_sort_stable(true, 1, true)?;
            let top = order.f_narrow(1, 0, depth as i64)?.f_contiguous()?;
            Ok(Vec::<i64>::try_from(&top.f_view([-1])?)?)
        })?;
        for (r, row) in neighbours.chunks(depth.max(1)).enumerate() {
            visit(start + r, row);
        }
        start += rows;
    }
    Ok(())
}

/// Evaluates rows of `[N, D]` embeddings (any float kind and device) with one label each.
pub fn evaluate(embeddings: &Tensor, labels: &[String]) -> Result<EvalReport, EvalError> {
    let size = embeddings.size();
    if size.len() != 2 {
        return Err(EvalError::Input(format!(
            "embeddings of shape {size:?}, expected [N, D]"
        )));
    }
    let n = size[0] as usize;
    if n != labels.len() {
        return Err(EvalError::Input(format!(
            "{n} embeddings but {} labels",
            labels.len()
        )));
    }
    if n < 2 {
        return Err(EvalError::Input(format!("need at least 2 items, got {n}")));
    }
    let classes = class_ids(labels);
    let mut counts: HashMap<usize, usize> = HashMap::new();
    for &c in &classes {
        *counts.entry(c).or_default() += 1;
    }
    let max_r = counts.values().copied().max().unwrap_or(1) - 1;
    let depth = RECALL_KS[RECALL_KS.len() - 1].max(max_r).min(n - 1);

    let mut hits = [0usize; RECALL_KS.len()];
    let (mut ap_sum, mut ap_count) = (0f64, 0usize);
    for_each_ranking(embeddings, depth, |q, row| {
        let label = classes[q];
        let relevant: Vec<bool> = row.iter().map(|&j| classes[j as usize] == label).collect();
        let (recall, ap) = query_metrics(&relevant, counts[&label] - 1);
        for (h, hit) in hits.iter_mut().zip(recall) {
            *h += usize::from(hit);
        }
        if let Some(ap) = ap {
            ap_sum += ap;
            ap_count += 1;
        }
    })?;
    let recall_at = RECALL_KS
        .iter()
        .zip(hits)
        .map(|(k, h)| (k.to_string(), h as f64 / n as f64))
        .collect();
    Ok(EvalReport {
        n,
        recall_at,
        map_at_r: if ap_count == 0 {
            0.0
        } else {
            ap_sum / ap_count as f64
        },
    })
}

/// Evaluates embeddings given as rows of equal length.
pub fn evaluate_vectors(
    embeddings: &[Vec<f32>],
    labels: &[String],
) -> Result<EvalReport, EvalError> {
    let dim = embeddings.first().map_or(0, Vec::len);
    if embeddings.iter().any(|e| e.len() != dim) || dim == 0 {
        return Err(EvalError::Input(
            "embeddings must be non-empty rows of equal length".into(),
        ));
    }
    let flat: Vec<f32> = embeddings.concat();
    let t = Tensor::f_from_slice(&flat)?.f_view([embeddings.len() as i64, dim as i64])?;
    evaluate(&t, labels)
}

/// Recall@k hits and MAP@R for one query, from the relevance of its ranked neighbours
/// (at least `min(max k, R)` of them) and R = number of other same-label items.
fn query_metrics(relevant: &[bool], r: usize) -> ([bool; RECALL_KS.len()], Option<f64>) {
    let recall = RECALL_KS.map(|k| relevant.iter().take(k).any(|&x| x));
    if r == 0 {
        return (recall, None);
    }
    let (mut correct, mut sum) = (0usize, 0f64);
    for (i, &rel) in relevant.iter().take(r).enumerate() {
        if rel {
            correct += 1;
            sum += correct as f64 / (i + 1) as f64;
        }
    }
    (recall, Some(sum / r as f64))
}

fn class_ids(labels: &[String]) -> Vec<usize> {
    let mut ids: HashMap<&str, usize> = HashMap::new();
    labels
        .iter()
        .map(|l| {
            let next = ids.len();
            *ids.entry(l.as_str()).or_insert(next)
        })
        .collect()
}

impl EvalReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = format!("{:<10} {:>8}\n", "items", self.n);
        for (k, v) in &self.recall_at {
            out.push_str(&format!("{:<10} {:>8.4}\n", format!("Recall@{k}"), v));
        }
        out.push_str(&format!("{:<10} {:>8.4}\n", "MAP@R", self.map_at_r));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn labels(ls: &[&str]) -> Vec<String> {
        ls.iter().map(|s| s.to_string()).collect()
    }

    /// Plain-Rust reference: full sort by (similarity desc, index asc) per query.
    fn brute_force(emb: &[Vec<f32>], labels: &[String]) -> EvalReport {
        let n = emb.len();
        let norm = |v: &Vec<f32>| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let mut hits = [0usize; 4];
        let (mut ap_sum, mut ap_n) = (0.0, 0);
        for q in 0..n {
            let mut others: Vec<(f64, usize)> = (0..n)
                .filter(|&j| j != q)
                .map(|j| {
                    let dot: f64 = emb[q]
                        .iter()
                        .zip(&emb[j])
                        .map(|(a, b)| *a as f64 * *b as f64)
                        .sum();
                    (dot / (norm(&emb[q]) * norm(&emb[j])), j)
                })
                .collect();
            others.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap().then(a.1.cmp(&b.1)));
            let rel: Vec<bool> = others
                .iter()
                .map(|(_, j)| labels[*j] == labels[q])
                .collect();
            for (h, k) in hits.iter_mut().zip(RECALL_KS) {
                if rel.iter().take(k).any(|x| *x) {
                    *h += 1;
                }
            }
            let r = rel.iter().filter(|x| **x).count();
            if r > 0 {
                let mut correct = 0;
                let mut s = 0.0;
                for (i, &hit) in rel.iter().enumerate().take(r) {
                    if hit {
                        correct += 1;
                        s += correct as f64 / (i + 1) as f64;
                    }
                }
                ap_sum += s / r as f64;
                ap_n += 1;
            }
        }
        EvalReport {
            n,
            recall_at: RECALL_KS
                .iter()
                .zip(hits)
                .map(|(k, h)| (k.to_string(), h as f64 / n as f64))
                .collect(),
            map_at_r: if ap_n == 0 { 0.0 } else { ap_sum / ap_n as f64 },
        }
    }

    #[test]
    fn hand_computed_case_with_ties() {
        // Items on the unit circle. 0 and 1 are identical (a tie for every query), 2 is
        // orthogonal, 3 is opposite to 0.
        let emb = vec![
            vec![1.0, 0.0],
            vec![1.0, 0.0],
            vec![0.0, 1.0],
            vec![-1.0, 0.0],
            vec![0.0, 1.0],
        ];
        let l = labels(&["a", "b", "a", "b", "c"]);
        let r = evaluate_vectors(&emb, &l).unwrap();
        // Query 0 (a): 1 (s=1, b), then tie 2 & 4 at s=0 → 2 (a) before 4 (c), then 3.
        //   R = 1: AP = 0 (first neighbour wrong). R@1 0, R@2 1.
        // Query 1 (b): 0 (a), 2, 4, 3 (b). R = 1: AP 0. R@1,2 0; R@4 1.
        // Query 2 (a): 4 (s=1, c), tie 0,1,3 at s=0 → 0 (a). R = 1: AP 0. R@1 0, R@2 1.
        // Query 3 (b): tie 2, 4 at 0 → 2, 4, then 0, 1 at −1 → 0, 1 (b). R@4 1, AP 0.
        // Query 4 (c): R = 0, skipped for MAP@R; recall 0 everywhere.
        assert_eq!(r.n, 5);
        assert_eq!(r.recall_at["1"], 0.0);
        assert_eq!(r.recall_at["2"], 2.0 / 5.0);
        assert_eq!(r.recall_at["4"], 4.0 / 5.0);
        assert_eq!(r.recall_at["8"], 4.0 / 5.0);
        assert_eq!(r.map_at_r, 0.0);
        assert_eq!(r, brute_force(&emb, &l));
    }

    #[test]
    fn hand_computed_map_at_r() {
        // 1-d on the circle via angles; class a = {0, 1, 2}, class b = {3}.
        // Query 0 ranks: 1 (a), 3 (b), 2 (a). R = 2: AP = (1/1 + 0) / 2 = 0.5.
        let angle = |d: f32| vec![d.to_radians().cos(), d.to_radians().sin()];
        let emb = vec![angle(0.0), angle(10.0), angle(80.0), angle(30.0)];
        let l = labels(&["a", "a", "a", "b"]);
        let r = evaluate_vectors(&emb, &l).unwrap();
        // Query 1: 0 (a, 10°), 3 (b, 20°), 2 (a, 70°) → AP 0.5.
        // Query 2: 3 (b, 50°), 1 (a, 70°), 0 (a) → P@1 = 0, rel at 2: 1/2 → AP 0.25.
        // Query 3 (b): R = 0, skipped.
        assert!(
            (r.map_at_r - (0.5 + 0.5 + 0.25) / 3.0).abs() < 1e-12,
            "{r:?}"
        );
        assert_eq!(r.recall_at["1"], 2.0 / 4.0);
        assert_eq!(r.recall_at["2"], 3.0 / 4.0);
        let json = serde_json::to_string(&r).unwrap();
        assert!(
            json.starts_with(
                "{\"n\":4,\"recall_at\":{\"1\":0.5,\"2\":0.75,\"4\":0.75,\"8\":0.75},\"map_at_r\":"
            ),
            "{json}"
        );
    }

    #[test]
    fn matches_brute_force_on_random_data() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Entries ±1/√d with d a power of 4: rows are exactly unit-norm and every dot product is
        // an exact multiple of 1/d in f32, so there are many exact ties and no rounding noise.
        for (n, d, classes) in [(300usize, 16usize, 7usize), (50, 4, 2), (40, 16, 40)] {
            let v = 1.0 / (d as f32).sqrt();
            let emb: Vec<Vec<f32>> = (0..n)
                .map(|_| {
                    (0..d)
                        .map(|_| if rng.gen_bool(0.5) { v } else { -v })
                        .collect()
                })
                .collect();
            // Uneven class sizes.
            let l: Vec<String> = (0..n)
                .map(|_| (rng.gen_range(0..classes * classes) % classes).to_string())
                .collect();
            let got = evaluate_vectors(&emb, &l).unwrap();
            let want = brute_force(&emb, &l);
            assert_eq!(got.n, want.n);
            for k in ["1", "2", "4", "8"] {
                assert!(
                    (got.recall_at[k] - want.recall_at[k]).abs() < 1e-12,
                    "n={n} R@{k}"
                );
            }
            assert!(
                (got.map_at_r - want.map_at_r).abs() < 1e-9,
                "n={n}: {} vs {}",
                got.map_at_r,
                want.map_at_r
            );
        }
    }

    #[test]
    fn bad_inputs_error() {
        assert!(evaluate_vectors(&[vec![1.0]], &labels(&["a"])).is_err());
        assert!(evaluate_vectors(&[vec![1.0], vec![1.0]], &labels(&["a"])).is_err());
        assert!(evaluate_vectors(&[vec![1.0], vec![1.0, 2.0]], &labels(&["a", "b"])).is_err());
    }

    #[test]
    fn ten_thousand_random_items_give_chance_recall() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (n, d) = (10_000usize, 64usize);
        let flat: Vec<f32> = (0..n * d).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
        // On the device under test: evaluate takes embeddings on any device.
        let t = Tensor::from_slice(&flat)
            .view([n as i64, d as i64])
            .to_device(crate::model::test_support::test_device());
        let l: Vec<String> = (0..n).map(|i| (i % 10).to_string()).collect();
        // More items than one ranking chunk: the chunks together rank every item.
        let r = evaluate(&t, &l).unwrap();
        assert_eq!(r.n, n);
        // Random embeddings: Recall@1 ≈ 1 − 0.9 = 0.1.
        assert!((r.recall_at["1"] - 0.1).abs() < 0.03, "{r:?}");
    }
}
