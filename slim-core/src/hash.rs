//! The hash behind every fingerprint of Slim's (models, data sets, configurations, tables).

/// FNV-1a, 64 bits: a fast, stable hash for fingerprints (not for security).
pub struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Self::new()
    }
}

impl Fnv {
    pub fn finish(&self) -> u64 {
        self.0
    }
    pub fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
