//! Replay memory of low-fidelity exemplars under a byte budget (Zhao et al., TNNLS 2021).
