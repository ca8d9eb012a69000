//! LEO (Rusu et al., ICLR 2019): few-shot class proxies generated in a learned latent space.
