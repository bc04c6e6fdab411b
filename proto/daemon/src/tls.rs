//! The TLS crypto both daemons use: ring, preferring AES-128-GCM.
//!
//! Every byte of a seed is encrypted once by the agent and decrypted once by the receiver, so
//! the cipher is a visible share of a CPU-bound seed. AES-128-GCM runs 10 AES rounds to
//! AES-256's 14 and is as standard (TLS 1.3's mandatory suite); the rest of ring's suites stay
//! available, in ring's order, for peers that do not offer it.

use rustls::crypto::{ring, CryptoProvider};
use rustls::CipherSuite;

/// ring's provider with TLS 1.3 AES-128-GCM moved to the front of its suites.
pub fn provider() -> CryptoProvider {
    let mut p = ring::default_provider();
    // Stable: the other suites keep their order.
    p.cipher_suites
        .sort_by_key(|s| s.suite() != CipherSuite::TLS13_AES_128_GCM_SHA256);
    p
}

/// Makes [`provider`] the process's default, before any TLS object exists.
pub fn install_provider() {
    // Fails only when a default is already installed, which then stays.
    let _ = provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_aes_128_gcm_and_keeps_every_suite() {
        let ours: Vec<CipherSuite> = provider().cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(ours[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        let mut theirs: Vec<CipherSuite> = ring::default_provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        let mut sorted = ours.clone();
        sorted.sort_by_key(|s| format!("{s:?}"));
        theirs.sort_by_key(|s| format!("{s:?}"));
        assert_eq!(sorted, theirs);
    }
}
