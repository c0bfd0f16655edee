//! The instruction sets that kernels may use: what the machine has, capped by the environment
//! variable `SLIM_CPU` (`portable`, `avx2`, `avx512` or `vnni`), so that the kernels most
//! users' machines take (AVX2, or none) can be tested and timed on a machine that has more.
//! The cap is read once per process; an unknown value is reported on stderr and ignored.

use std::sync::OnceLock;

/// A level of kernels, each including the ones below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Plain Rust, as the compiler vectorizes it for the build's target.
    Portable,
    /// AVX2 and FMA.
    Avx2,
    /// AVX-512 F, BW and VL.
    Avx512,
    /// AVX-512 VNNI (and VBMI where the machine has it).
    Vnni,
}

impl Level {
    pub const ALL: [Level; 4] = [Level::Portable, Level::Avx2, Level::Avx512, Level::Vnni];

    pub fn name(self) -> &'static str {
        match self {
            Level::Portable => "portable",
            Level::Avx2 => "avx2",
            Level::Avx512 => "avx512",
            Level::Vnni => "vnni",
        }
    }

    pub fn parse(s: &str) -> Option<Level> {
        Level::ALL.into_iter().find(|l| l.name() == s.trim())
    }
}

/// The highest level this machine runs, whatever the cap.
pub fn machine() -> Level {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vl");
        if avx512 && has!("avx512vnni") {
            Level::Vnni
        } else if avx512 {
            Level::Avx512
        } else if has!("avx2") && has!("fma") {
            Level::Avx2
        } else {
            Level::Portable
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Level::Portable
    }
}

/// The cap `SLIM_CPU` sets (the highest level when it is unset).
pub fn cap() -> Level {
    static CAP: OnceLock<Level> = OnceLock::new();
    *CAP.get_or_init(|| match std::env::var("SLIM_CPU") {
        Ok(v) if !v.trim().is_empty() => Level::parse(&v).unwrap_or_else(|| {
            eprintln!(
                "slim: warning: SLIM_CPU={v} is not portable, avx2, avx512 or vnni; it is ignored"
            );
            Level::Vnni
        }),
        _ => Level::Vnni,
    })
}

/// Whether kernels of `level` may run here: the cap allows them (the caller checks that the
/// machine has the instructions).
pub fn allows(level: Level) -> bool {
    cap() >= level
}

/// The level kernels run at: the machine's, under the cap.
pub fn level() -> Level {
    machine().min(cap())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_ordered_and_named() {
        for l in Level::ALL {
            assert_eq!(Level::parse(l.name()), Some(l));
        }
        assert!(Level::Portable < Level::Avx2 && Level::Avx512 < Level::Vnni);
        assert_eq!(Level::parse("sse9"), None);
        assert!(level() <= machine() && level() <= cap());
    }
}
