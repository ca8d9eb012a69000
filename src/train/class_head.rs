//! Class head: cosine proxies with a scale, trained with Balanced Softmax cross-entropy.
