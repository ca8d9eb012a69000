//! How the online trainer learns uploaded classes.
//!
//! A class uploaded through `POST /v1/classes` is *pending* until a generation includes it
//! (the registration is durable, see [`crate::store::ClassRecord`]). While classes are pending
//! every batch is made of them — up to P pending classes × K of their examples, each with its
//! low-fidelity twin when duplets are on — plus `replay_per_batch` exemplars of old classes from
//! the replay memory (or, without replay, a P×K batch of the store's other labelled examples).
//! After `focus_steps` such steps the classes are offered to the replay memory, the classifier
//! is adapted, LEO is meta-trained, and the trainer publishes: that generation is the first to
//! include them. Without pending classes the trainer samples P×K batches from the whole store
//! as before; the class head trains jointly in both cases.
use std::collections::{BTreeMap, HashMap, HashSet};

use rand::rngs::StdRng;
use rand::Rng;

use super::augment::Augment;
use super::incremental::{ClassExamples, ClassLearner, ClassLearningConfig, FlatBatch, StableIds};
use super::offline::{StepStats, Trainer};
use super::online::{ReplayShare, ReplayStatus};
use super::pool::ExamplePool;
use super::sampler::PkSampler;
use super::TrainError;
use crate::embed::preprocess::values_from_raw;
use crate::model::spec::InputSpec;
use crate::store::{LabelledExample, Store};

/// Numeric ids of focus examples the pool has not numbered start here (above the pool's
/// sequential ids).
const FOCUS_ID_BASE: i64 = 1 << 39;
/// Added to an example's numeric id for its low-fidelity twin.
const TWIN_ID_OFFSET: i64 = 1 << 40;
/// Numeric ids of replayed exemplars start here.
const REPLAY_ID_BASE: i64 = 1 << 41;

/// A pending class: its examples and the focus steps it has had.
struct Pending {
    examples: ClassExamples,
    steps: usize,
}

/// The class head, replay memory and pending classes of the online trainer.
pub struct ClassFocus {
    learner: ClassLearner,
    input: InputSpec,
    focus_steps: usize,
    pending: BTreeMap<String, Pending>,
    /// Classes learnt since the last publish (marked in the store when it happens).
    learnt: Vec<String>,
    /// Labels given a proxy and offered to the replay memory in this session, with how many
    /// examples they had then. Examples arrive over time, so a label is offered again when it
    /// has more, until it had `replay_candidates` at an offer.
    remembered: HashMap<String, usize>,
    /// Numeric ids of replayed exemplars, by the example id they were made from.
    replay_ids: StableIds,
    /// Examples the store listed for each pending class when it was last read.
    listed: HashMap<String, usize>,
    /// Numeric ids of focus examples the pool has not numbered (a class with one example),
    /// by example id, never reused.
    focus_ids: StableIds,
    /// The head lost classes since [`ClassFocus::take_head_lost`] was last called.
    head_lost: bool,
    /// Pending classes in the last batch [`ClassFocus::next_batch`] made; the next
    /// [`ClassFocus::step`] counts for them only.
    in_batch: Vec<String>,
}

impl ClassFocus {
    /// A focus with an empty head for `trainer`'s network.
    pub fn new(config: &ClassLearningConfig, trainer: &Trainer) -> Result<Self, TrainError> {
        let spec = trainer.spec();
        let learner = ClassLearner::new(
            config.clone(),
            spec.input.clone(),
            spec.embedding_dim as i64,
            trainer.device(),
        )?;
        Ok(ClassFocus {
            learner,
            input: spec.input.clone(),
            focus_steps: config.focus_steps.max(1),
            pending: BTreeMap::new(),
            learnt: Vec::new(),
            remembered: HashMap::new(),
            replay_ids: StableIds::new(REPLAY_ID_BASE),
            listed: HashMap::new(),
            focus_ids: StableIds::new(FOCUS_ID_BASE),
            head_lost: false,
            in_batch: Vec::new(),
        })
    }

    /// Restores the head, replay memory and LEO published with the generation the trainer
    /// starts from.
    pub fn restore(&mut self, checkpoint: &std::path::Path) -> Result<(), TrainError> {
        self.learner.restore(checkpoint)?;
        // Labels with a proxy and exemplars are offered to the memory again only once they
        // have more examples than their latest offer gave.
        if let Some(replay) = self.learner.replay() {
            for share in replay.classes() {
                if self.learner.knows(&share.label) {
                    self.remembered.insert(share.label, share.offered);
                }
            }
        }
        Ok(())
    }

    /// Writes the head, replay memory and LEO into a checkpoint directory.
    pub fn save(&self, checkpoint: &std::path::Path) -> Result<(), TrainError> {
        self.learner.save(checkpoint)
    }

    /// Reads the pending classes from the store and their inputs (`examples` is the store's
    /// list of labelled examples), gives every label a proxy, and puts labels that are not
    /// pending into the replay memory; a label no stored example has leaves the head
    /// ([`ClassFocus::take_head_lost`]). A label that cannot be read or learnt is logged and
    /// tried again at the next refresh; the others go on.
    pub fn refresh(
        &mut self,
        trainer: &mut Trainer,
        pool: &mut ExamplePool,
        store: &Store,
        examples: &[LabelledExample],
    ) -> Result<(), TrainError> {
        // A deleted (or relabelled) example leaves the replay memory too, and its label is
        // offered to the memory again to replace it.
        let stored: HashSet<(&str, &str)> = examples
            .iter()
            .map(|e| (e.id.as_str(), e.label.as_str()))
            .collect();
        let held_before = self.exemplars_held();
        let forgotten = self
            .learner
            .forget_missing_examples(|id, label| stored.contains(&(id, label)));
        if forgotten > 0 {
            tracing::info!(forgotten, "replay exemplars of deleted examples dropped");
            let held_after = self.exemplars_held();
            for (label, held) in held_before {
                if held_after.get(&label).copied().unwrap_or(0) < held {
                    self.remembered.remove(&label);
                }
            }
        }
        // A label nothing in the store has any more (a deleted class) leaves the head. The
        // XBM memory labels its rows by head row, which this renumbers: it starts afresh.
        let stored_labels: HashSet<&str> = examples.iter().map(|e| e.label.as_str()).collect();
        let dropped = self.drop_from_head(trainer, |label| stored_labels.contains(label))?;
        if !dropped.is_empty() {
            tracing::info!(?dropped, "classes without stored examples left the head");
        }
        // Classes learnt but not yet marked by a publish stay out of the focus.
        let pending: Vec<String> = store
            .pending_classes()?
            .into_iter()
            .filter(|label| !self.learnt.contains(label))
            .collect();
        let pending_set: HashSet<&str> = pending.iter().map(String::as_str).collect();
        self.pending
            .retain(|label, _| pending_set.contains(label.as_str()));
        self.listed
            .retain(|label, _| pending_set.contains(label.as_str()));
        for label in &pending {
            let ids: Vec<String> = examples
                .iter()
                .filter(|e| &e.label == label)
                .map(|e| e.id.clone())
                .collect();
            // A pending class whose examples were all deleted one by one is not learnt.
            if ids.is_empty() {
                self.pending.remove(label);
                self.listed.remove(label);
                continue;
            }
            // Read again only when the store lists another number of examples (some may be
            // unusable by this model, so the count read is what is compared).
            if self.listed.get(label) == Some(&ids.len()) {
                continue;
            }
            let class = match self.read_pending(trainer, store, label, &ids) {
                Ok(class) => class,
                Err(e) => {
                    tracing::warn!(label, "pending class not read (tried again later): {e}");
                    continue;
                }
            };
            self.listed.insert(label.clone(), ids.len());
            let Some(class) = class else {
                tracing::warn!(label, "no example of this pending class can be learnt from");
                self.pending.remove(label);
                self.drop_from_head(trainer, |known| known != label)?;
                continue;
            };
            let steps = self.pending.get(label).map_or(0, |p| p.steps);
            self.pending.insert(
                label.clone(),
                Pending {
                    examples: class,
                    steps,
                },
            );
        }
        // Every other label: a proxy in the head and exemplars in the replay memory, offered
        // again while the label gains examples, up to `replay_candidates` of them.
        let mut stored: BTreeMap<String, usize> = BTreeMap::new();
        for (_, label, _) in &pool.examples {
            if !pending_set.contains(label.as_str()) {
                *stored.entry(label.clone()).or_default() += 1;
            }
        }
        let candidates = self.learner.config().replay_candidates.max(1);
        for (label, count) in stored {
            let offered = self.remembered.get(&label).copied();
            if offered.is_some_and(|offered| offered >= candidates.min(count)) {
                continue;
            }
            let learnt = pool
                .class_examples(store, &label, candidates, &self.input)
                .and_then(|class| {
                    self.learner
                        .add_classes(trainer, std::slice::from_ref(&class))?;
                    self.learner.remember(trainer, &class)
                });
            match learnt {
                Ok(_) => {
                    self.remembered.insert(label, count);
                }
                Err(e) => tracing::warn!(label, "label not remembered (tried again later): {e}"),
            }
        }
        Ok(())
    }

    /// Drops the head's classes `keep` refuses, with their replay offers and unpublished
    /// learning; the XBM memory, whose rows are labelled by head row (renumbered here),
    /// starts afresh. Returns the labels dropped.
    fn drop_from_head(
        &mut self,
        trainer: &mut Trainer,
        keep: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, TrainError> {
        let dropped = self.learner.forget_classes(keep)?;
        if !dropped.is_empty() {
            trainer.clear_memory();
            self.head_lost = true;
        }
        for label in &dropped {
            self.remembered.remove(label);
            self.learnt.retain(|l| l != label);
        }
        Ok(dropped)
    }

    /// Whether the head lost classes since the last call (a generation is then due even
    /// without a step).
    pub fn take_head_lost(&mut self) -> bool {
        std::mem::take(&mut self.head_lost)
    }

    /// A pending class's examples from the store, with a proxy in the head (`None`: no
    /// example this model can take).
    fn read_pending(
        &mut self,
        trainer: &Trainer,
        store: &Store,
        label: &str,
        ids: &[String],
    ) -> Result<Option<ClassExamples>, TrainError> {
        let class = read_class(store, label, ids, &self.input)?;
        if class.values.is_empty() {
            return Ok(None);
        }
        self.learner
            .add_classes(trainer, std::slice::from_ref(&class))?;
        Ok(Some(class))
    }

    /// Exemplars the replay memory holds, by label.
    fn exemplars_held(&self) -> HashMap<String, usize> {
        self.learner
            .replay()
            .map(|replay| {
                replay
                    .classes()
                    .into_iter()
                    .map(|share| (share.label, share.exemplars))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether every proxy of the class head is finite.
    pub fn head_finite(&self) -> Result<bool, TrainError> {
        self.learner.head().is_finite()
    }

    /// Whether classes are pending.
    pub fn focusing(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Labels of the pending classes.
    pub fn pending_labels(&self) -> Vec<String> {
        self.pending.keys().cloned().collect()
    }

    /// The next batch: pending classes with replay while focusing, else a P×K batch of the
    /// pool (`None` when the pool cannot make one).
    pub fn next_batch(
        &mut self,
        pool: &mut ExamplePool,
        store: &Store,
        p: usize,
        k: usize,
        rng: &mut StdRng,
    ) -> Result<Option<FlatBatch>, TrainError> {
        let mut batch = FlatBatch::default();
        self.in_batch.clear();
        if self.pending.is_empty() {
            let Some(indices) = pool.sampler.as_mut().map(PkSampler::next_batch) else {
                return Ok(None);
            };
            pool.push_batch(store, &indices, &self.input, &mut batch)?;
            return Ok(Some(batch));
        }
        // The P pending classes that have had the fewest focus steps (label order among
        // equals), so that with more than P pending classes every one gets its turn.
        let mut turn: Vec<(&String, &Pending)> = self.pending.iter().collect();
        turn.sort_by_key(|(_, pending)| pending.steps);
        turn.truncate(p.max(1));
        // An example's numeric id (for masking self-pairs against the memory) is the pool's,
        // so it is the same wherever the example appears and whenever.
        let focus_ids = &mut self.focus_ids;
        let mut numeric_id = |example: &str| match pool.numeric_id.get(example) {
            Some(&id) => id,
            None => focus_ids.id(example),
        };
        for (label, pending) in turn {
            let class = &pending.examples;
            let picks: Vec<(&[f32], i64)> = (0..k.max(2))
                .map(|_| {
                    let i = rng.gen_range(0..class.values.len());
                    (class.values[i].as_slice(), numeric_id(&class.ids[i]))
                })
                .collect();
            self.learner
                .push_examples(&mut batch, label, &picks, TWIN_ID_OFFSET)?;
            self.in_batch.push(label.clone());
        }
        let replay = self.learner.config().replay_per_batch;
        if self.learner.replay().is_some_and(|r| !r.is_empty()) {
            // An exemplar is an example of its own, like a duplet's twin: another rendering of
            // the stored example it was made from, and a positive pair with it.
            let replay_ids = &mut self.replay_ids;
            self.learner
                .push_replay(&mut batch, replay, |id| replay_ids.id(id), rng)?;
        } else if let Some(indices) = pool.sampler.as_mut().map(PkSampler::next_batch) {
            pool.push_batch(store, &indices, &self.input, &mut batch)?;
        }
        Ok(Some(batch))
    }

    /// One step on `batch`; while focusing, counts it for the pending classes the batch
    /// holds and, once they all had `focus_steps`, remembers them, adapts the classifier and
    /// meta-trains LEO.
    /// Returns the step's statistics and whether a set of classes was just learnt (the
    /// trainer then publishes). Once the step is taken, a failure of what follows it is
    /// logged, not returned (the step did change the weights): the classes stay pending and
    /// learning them is tried again after the next step.
    pub fn step(
        &mut self,
        trainer: &mut Trainer,
        batch: &FlatBatch,
        augment: &Augment,
        lr: f64,
        rng: &mut StdRng,
    ) -> Result<(StepStats, bool), TrainError> {
        let stats = self.learner.step(trainer, batch, augment, lr, rng)?;
        let mut learnt_now = false;
        if !self.pending.is_empty() {
            for label in self.in_batch.drain(..) {
                if let Some(pending) = self.pending.get_mut(&label) {
                    pending.steps += 1;
                }
            }
            if self.pending.values().all(|p| p.steps >= self.focus_steps) {
                match self.learn_pending(trainer, rng) {
                    Ok(()) => learnt_now = true,
                    Err(e) => tracing::warn!(
                        "pending classes not learnt yet (tried again after the next step): {e}"
                    ),
                }
            }
        }
        if self.learner.adaptation_due() {
            if let Err(e) = self.learner.adapt(trainer, &[], rng) {
                tracing::warn!("classifier adaptation failed (tried again later): {e}");
            }
        }
        Ok((stats, learnt_now))
    }

    /// Remembers the pending classes in the replay memory, adapts the classifier and
    /// meta-trains LEO; they are learnt (no longer pending) only when all of it succeeds.
    fn learn_pending(&mut self, trainer: &Trainer, rng: &mut StdRng) -> Result<(), TrainError> {
        let classes: Vec<ClassExamples> =
            self.pending.values().map(|p| p.examples.clone()).collect();
        for class in &classes {
            self.learner.remember(trainer, class)?;
            self.remembered.insert(class.label.clone(), class.ids.len());
        }
        self.learner.adapt(trainer, &classes, rng)?;
        self.learner.meta_train(trainer, rng)?;
        self.pending.clear();
        self.learnt.extend(classes.into_iter().map(|c| c.label));
        Ok(())
    }

    /// Classes learnt since the last call (to be marked as included by the next generation).
    pub fn take_learnt(&mut self) -> Vec<String> {
        std::mem::take(&mut self.learnt)
    }

    /// The replay memory's occupancy.
    pub fn replay_status(&self) -> ReplayStatus {
        let Some(replay) = self.learner.replay() else {
            return ReplayStatus::default();
        };
        ReplayStatus {
            budget_bytes: replay.config().budget_bytes,
            used_bytes: replay.bytes_used(),
            classes: replay
                .classes()
                .into_iter()
                .map(|s| {
                    let share = ReplayShare {
                        exemplars: s.exemplars,
                        bytes: s.bytes,
                    };
                    (s.label, share)
                })
                .collect(),
        }
    }
}

/// Reads and preprocesses the examples `ids` of `label` from the store, leaving out those
/// this model's input cannot take.
fn read_class(
    store: &Store,
    label: &str,
    ids: &[String],
    input: &InputSpec,
) -> Result<ClassExamples, TrainError> {
    let rows = store.inputs_of(ids)?;
    let mut class = ClassExamples {
        label: label.to_owned(),
        ids: Vec::with_capacity(rows.len()),
        values: Vec::with_capacity(rows.len()),
    };
    for row in rows {
        match values_from_raw(&row.input, &row.input_kind, input) {
            Ok(values) => {
                class.ids.push(row.id);
                class.values.push(values);
            }
            // Stored for another model's input: this model cannot learn from it.
            Err(e) => tracing::warn!(id = %row.id, label, "not trained on: {e}"),
        }
    }
    Ok(class)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use rand::SeedableRng;

    use super::*;
    use crate::store::{ClassExample, InputKind};
    use crate::train::incremental::tests::{class, input, trainer};

    /// Stores `n` more examples of class `c` as items labelled `label`, ids `label-N`.
    fn store_items(store: &Store, label: &str, c: usize, n: usize, rng: &mut StdRng) {
        let first = store
            .labelled_examples()
            .unwrap()
            .iter()
            .filter(|e| e.label == label)
            .count();
        let items: Vec<crate::store::NewItem> = class(c, n, rng)
            .values
            .iter()
            .enumerate()
            .map(|(i, values)| crate::store::NewItem {
                id: format!("{label}-{}", first + i),
                label: Some(label.into()),
                metadata: serde_json::json!({}),
                input: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                input_kind: InputKind::Tensor {
                    shape: vec![1, 8, 8],
                },
                embedding: vec![1.0],
                model_version: 1,
            })
            .collect();
        store.upsert_items(&items).unwrap();
    }

    #[test]
    fn a_label_is_offered_to_the_replay_memory_again_as_its_examples_arrive() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut rng = StdRng::seed_from_u64(6);
        store_items(&store, "a", 0, 2, &mut rng);
        store_items(&store, "b", 1, 2, &mut rng);
        let config = ClassLearningConfig {
            duplets: false,
            adapt_every: 0,
            replay_candidates: 6,
            ..ClassLearningConfig::default()
        };
        let mut trainer = trainer();
        let mut focus = ClassFocus::new(&config, &trainer).unwrap();
        let mut pool = ExamplePool::default();
        let defaults = crate::config::Config::load(None, []).unwrap().trainer;
        let mut refresh = |focus: &mut ClassFocus, trainer: &mut Trainer| {
            let examples = store.labelled_examples().unwrap();
            pool.refresh(&examples, &defaults, 0);
            focus
                .refresh(trainer, &mut pool, &store, &examples)
                .unwrap();
            let replay = focus.replay_status();
            ["a", "b"].map(|label| replay.classes[label].exemplars)
        };
        assert_eq!(refresh(&mut focus, &mut trainer), [2, 2]);
        // More examples of "a": offered again, up to the 6 candidates; "b" is left alone.
        store_items(&store, "a", 0, 3, &mut rng);
        assert_eq!(refresh(&mut focus, &mut trainer), [5, 2]);
        store_items(&store, "a", 0, 4, &mut rng);
        assert_eq!(refresh(&mut focus, &mut trainer), [6, 2]);

        // An exemplar whose item is deleted is replaced from the label's other examples.
        let exemplar = focus.learner.replay().unwrap().exemplars("a")[0].id.clone();
        assert!(store.delete_item(&exemplar).unwrap());
        assert_eq!(refresh(&mut focus, &mut trainer), [6, 2]);
        let held: Vec<&str> = focus
            .learner
            .replay()
            .unwrap()
            .exemplars("a")
            .iter()
            .map(|e| e.id.as_str())
            .collect();
        assert!(!held.contains(&exemplar.as_str()), "{held:?}");

        // After a restart from a checkpoint, a label that gains examples is offered again.
        let checkpoint = tempfile::tempdir().unwrap();
        focus.save(checkpoint.path()).unwrap();
        let mut focus = ClassFocus::new(&config, &trainer).unwrap();
        focus.restore(checkpoint.path()).unwrap();
        assert_eq!(refresh(&mut focus, &mut trainer), [6, 2], "nothing new");
        store_items(&store, "b", 1, 2, &mut rng);
        assert_eq!(refresh(&mut focus, &mut trainer), [6, 4]);
    }

    #[test]
    fn a_pending_class_whose_examples_are_all_deleted_is_not_learnt() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut rng = StdRng::seed_from_u64(7);
        store_items(&store, "old-a", 0, 3, &mut rng);
        store_items(&store, "old-b", 1, 3, &mut rng);
        store_items(&store, "new", 2, 3, &mut rng);
        let registration = crate::store::ClassRegistration {
            label: "new".into(),
            expected_generation: Some(2),
            now_unix: 0,
        };
        store.add_class(&registration, &[]).unwrap();
        let config = ClassLearningConfig {
            duplets: false,
            adapt_every: 0,
            ..ClassLearningConfig::default()
        };
        let mut trainer = trainer();
        let mut focus = ClassFocus::new(&config, &trainer).unwrap();
        let mut pool = ExamplePool::default();
        let defaults = crate::config::Config::load(None, []).unwrap().trainer;
        let refresh = |focus: &mut ClassFocus, trainer: &mut Trainer, pool: &mut ExamplePool| {
            let examples = store.labelled_examples().unwrap();
            pool.refresh(&examples, &defaults, 0);
            focus.refresh(trainer, pool, &store, &examples).unwrap();
            focus.take_head_lost()
        };
        assert!(!refresh(&mut focus, &mut trainer, &mut pool));
        assert_eq!(focus.pending_labels(), ["new"]);
        // Replayed exemplars of the old labels keep one numeric id however often they are
        // drawn, so self-pairs are masked against the XBM memory (16 draws per batch here,
        // 6 exemplars); it is their own, not the id of the item they were made from.
        let mut replayed: HashMap<i64, Vec<f32>> = HashMap::new();
        let mut draws = 0;
        for _ in 0..4 {
            let batch = focus
                .next_batch(&mut pool, &store, 2, 2, &mut rng)
                .unwrap()
                .unwrap();
            let numel = batch.values.len() / batch.len();
            for (i, (label, id)) in batch.labels.iter().zip(&batch.ids).enumerate() {
                if label.starts_with("old") {
                    draws += 1;
                    assert!(*id >= REPLAY_ID_BASE);
                    let values = batch.values[i * numel..(i + 1) * numel].to_vec();
                    assert_eq!(replayed.entry(*id).or_insert(values.clone()), &values);
                }
            }
        }
        assert_eq!(draws, 64);
        assert!(replayed.len() <= 6, "{} ids", replayed.len());
        for i in 0..3 {
            assert!(store.delete_item(&format!("new-{i}")).unwrap());
        }
        assert!(
            refresh(&mut focus, &mut trainer, &mut pool),
            "its proxy left the head"
        );
        assert!(!focus.focusing(), "{:?}", focus.pending_labels());
        assert!(!focus.learner.knows("new"));
        // Examples again: pending again.
        store_items(&store, "new", 2, 2, &mut rng);
        assert!(!refresh(&mut focus, &mut trainer, &mut pool));
        assert_eq!(focus.pending_labels(), ["new"]);
    }

    #[test]
    fn pending_classes_each_get_their_focus_steps_and_a_deleted_class_leaves_the_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut rng = StdRng::seed_from_u64(5);
        let labels = ["c0", "c1", "c2"];
        for c in 0..labels.len() {
            let examples = class(c, 4, &mut rng);
            let stored: Vec<ClassExample> = examples
                .ids
                .iter()
                .zip(&examples.values)
                .map(|(id, values)| ClassExample {
                    id: id.clone(),
                    input: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    input_kind: InputKind::Tensor {
                        shape: vec![1, 8, 8],
                    },
                })
                .collect();
            let class = crate::store::ClassRegistration {
                label: examples.label.clone(),
                expected_generation: None,
                now_unix: 0,
            };
            store.add_class(&class, &stored).unwrap();
        }
        let focus_steps = 3;
        let config = ClassLearningConfig {
            replay: false,
            duplets: false,
            adapt_every: 0,
            focus_steps,
            ..ClassLearningConfig::default()
        };
        let mut trainer = trainer();
        trainer.set_memory(crate::train::offline::MemorySettings {
            size: 64,
            ..crate::train::offline::MemorySettings::off()
        });
        let mut focus = ClassFocus::new(&config, &trainer).unwrap();
        let mut pool = ExamplePool::default();
        let examples = store.labelled_examples().unwrap();
        focus
            .refresh(&mut trainer, &mut pool, &store, &examples)
            .unwrap();
        assert_eq!(focus.pending_labels(), labels);

        // Two classes per batch: three classes need at least ⌈3 × 3 / 2⌉ = 5 steps.
        let augment = Augment::for_input(&input(), 0, false);
        let mut batches: HashMap<String, usize> = HashMap::new();
        let mut ids_of: HashMap<String, HashSet<i64>> = HashMap::new();
        let mut steps = 0;
        loop {
            let batch = focus
                .next_batch(&mut pool, &store, 2, 2, &mut rng)
                .unwrap()
                .unwrap();
            let in_batch: HashSet<&String> = batch.labels.iter().collect();
            assert_eq!(in_batch.len(), 2, "two pending classes per batch");
            for label in in_batch {
                *batches.entry(label.clone()).or_default() += 1;
            }
            for (label, id) in batch.labels.iter().zip(&batch.ids) {
                ids_of.entry(label.clone()).or_default().insert(*id);
            }
            let (_, learnt) = focus
                .step(&mut trainer, &batch, &augment, 1e-3, &mut rng)
                .unwrap();
            steps += 1;
            if learnt {
                break;
            }
            assert!(steps < 20, "never learnt: {batches:?}");
        }
        assert_eq!(steps, 5, "{batches:?}");
        for label in labels {
            assert!(batches[label] >= focus_steps, "{label}: {batches:?}");
        }
        assert_eq!(focus.take_learnt(), labels);
        // An example keeps its id from batch to batch, and no two classes share one.
        for label in labels {
            assert!(ids_of[label].len() <= 4, "{label}: {:?}", ids_of[label]);
            for other in labels.iter().filter(|o| **o != label) {
                assert!(ids_of[label].is_disjoint(&ids_of[*other]));
            }
        }

        // A deleted class leaves the head at the next read of the store, and the XBM memory,
        // whose rows are labelled by head row, is emptied; training goes on with the others.
        assert!(trainer.memory_fill() > 0);
        let proxies = focus.learner.head().proxies().unwrap();
        store.delete_class("c1").unwrap();
        let examples = store.labelled_examples().unwrap();
        focus
            .refresh(&mut trainer, &mut pool, &store, &examples)
            .unwrap();
        assert_eq!(focus.learner.head().labels(), ["c0", "c2"]);
        let rows = tch::Tensor::from_slice(&[0i64, 2]).to_device(proxies.device());
        assert!(focus
            .learner
            .head()
            .proxies()
            .unwrap()
            .equal(&proxies.index_select(0, &rows)));
        assert_eq!(trainer.memory_fill(), 0);
        let mut batch = crate::train::incremental::FlatBatch::default();
        for (c, label) in [(0, "c0"), (2, "c2")] {
            for (i, values) in class(c, 2, &mut rng).values.iter().enumerate() {
                batch.push(values, label, (c * 10 + i) as i64);
            }
        }
        focus
            .step(&mut trainer, &batch, &augment, 1e-3, &mut rng)
            .unwrap();
        assert!(trainer.memory_fill() > 0);
    }
}
