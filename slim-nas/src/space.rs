//! Search spaces: what the tokens of a candidate mean, and the graph they make.
//!
//! Every token is a choice among a few values, listed from the cheapest to the dearest (fewer
//! channels, a smaller kernel, fewer blocks first): the search relies on that order to find a
//! candidate under a limit by shrinking the hand-made network one token at a time. The initial
//! tokens of each built-in space are the zoo's network of the same width, so the search starts
//! from the hand-made baseline and its graph is the zoo's.

use std::collections::BTreeMap;

use serde_json::json;
use slim_core::zoo::{self, ResStage, V2Stage, ZooConfig};
use slim_core::Graph;

use crate::{NasError, Result};

/// One token: its name and its choices, cheapest first.
#[derive(Clone, Debug, PartialEq)]
pub struct Token {
    pub name: String,
    pub choices: Vec<String>,
}

impl Token {
    fn new(name: String, choices: impl IntoIterator<Item = impl ToString>) -> Self {
        Token {
            name,
            choices: choices.into_iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// A space of architectures.
pub trait SearchSpace: Sync {
    /// The name it is registered under.
    fn name(&self) -> String;
    /// What makes this space differ from another of the same name (its width, input,
    /// classes): a search's history is only resumed, or exported from, by the same space.
    fn key(&self) -> serde_json::Value;
    /// The tokens, each with its choices (cheapest first).
    fn tokens(&self) -> Vec<Token>;
    /// The starting candidate: the hand-made network.
    fn initial(&self) -> Vec<usize>;
    /// The graph of a candidate.
    fn graph(&self, tokens: &[usize]) -> Result<Graph>;

    /// The supernet of one-shot search: the candidate whose every layer holds the same layer
    /// of any other candidate (more channels, a larger kernel, more blocks). By default every
    /// token at its dearest choice.
    fn supernet(&self) -> Vec<usize> {
        self.ranges().iter().map(|r| r.saturating_sub(1)).collect()
    }

    /// The supernet's name for a parameter of candidate `tokens` (a weight shared with the
    /// supernet is the leading slice of the supernet's, or its centre for kernel windows). By
    /// default the same name: spaces whose names depend on the tokens override it.
    fn supernet_param(&self, tokens: &[usize], name: &str) -> String {
        let _ = tokens;
        name.to_string()
    }

    /// The number of choices of each token.
    fn ranges(&self) -> Vec<usize> {
        self.tokens().iter().map(|t| t.choices.len()).collect()
    }

    /// Candidates that sample the space for timing (a latency table's): the initial one, the
    /// cheapest, and `samples` drawn by a fixed generator (the same each time), with names.
    fn timing_picks(&self, samples: usize) -> Vec<(String, Vec<usize>)> {
        let ranges = self.ranges();
        let mut picks = vec![
            ("initial".to_string(), self.initial()),
            ("cheapest".to_string(), vec![0; ranges.len()]),
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..samples {
            let tokens = ranges
                .iter()
                .map(|&r| {
                    state = state
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((state >> 33) % r as u64) as usize
                })
                .collect();
            picks.push((format!("sample{}", i + 1), tokens));
        }
        picks
    }

    /// A candidate in words: `stage2.kernel=5 ...` for every token that differs from the
    /// initial candidate (`initial` when none does).
    fn describe(&self, tokens: &[usize]) -> String {
        let init = self.initial();
        let parts: Vec<String> = self
            .tokens()
            .iter()
            .zip(tokens)
            .zip(&init)
            .filter(|((_, t), i)| t != i)
            .map(|((tok, &t), _)| {
                format!(
                    "{}={}",
                    tok.name,
                    tok.choices.get(t).map(String::as_str).unwrap_or("?")
                )
            })
            .collect();
        if parts.is_empty() {
            "initial".into()
        } else {
            parts.join(" ")
        }
    }
}

/// Checks a candidate against a space's token ranges.
pub fn check_tokens(space: &dyn SearchSpace, tokens: &[usize]) -> Result<()> {
    let all = space.tokens();
    if all.is_empty() {
        return Err(NasError::Invalid(format!(
            "the search space `{}` has no tokens",
            space.name()
        )));
    }
    if let Some(t) = all.iter().find(|t| t.choices.is_empty()) {
        return Err(NasError::Invalid(format!(
            "token `{}` of the search space `{}` has no choices",
            t.name,
            space.name()
        )));
    }
    if tokens.len() != all.len() {
        return Err(NasError::Invalid(format!(
            "a candidate of the search space `{}` needs {} tokens, this one has {}",
            space.name(),
            all.len(),
            tokens.len()
        )));
    }
    for (t, tok) in tokens.iter().zip(&all) {
        if *t >= tok.choices.len() {
            return Err(NasError::Invalid(format!(
                "token `{}` is {t}, outside its {} choices",
                tok.name,
                tok.choices.len()
            )));
        }
    }
    Ok(())
}

/// Builds a space for an input shape, class count and width.
pub type SpaceFactory = Box<dyn Fn(&ZooConfig) -> Result<Box<dyn SearchSpace>> + Send + Sync>;

/// The spaces a search can be asked for by name: the built-in ones, and any a user registers.
pub struct Spaces {
    factories: BTreeMap<String, SpaceFactory>,
}

impl Spaces {
    /// `mobilenet_v2`, `mobilenet_v1` and `resnet`.
    pub fn builtin() -> Self {
        let mut s = Spaces {
            factories: BTreeMap::new(),
        };
        s.register(
            "mobilenet_v2",
            Box::new(|c| Ok(Box::new(MobileNetV2Space::new(c.clone())?) as Box<dyn SearchSpace>)),
        );
        s.register(
            "mobilenet_v1",
            Box::new(|c| Ok(Box::new(MobileNetV1Space::new(c.clone())?) as Box<dyn SearchSpace>)),
        );
        s.register(
            "resnet",
            Box::new(|c| Ok(Box::new(ResNetSpace::new(c.clone())?) as Box<dyn SearchSpace>)),
        );
        s
    }

    /// Adds (or replaces) a space.
    pub fn register(&mut self, name: &str, factory: SpaceFactory) {
        self.factories.insert(name.to_string(), factory);
    }

    pub fn names(&self) -> Vec<String> {
        self.factories.keys().cloned().collect()
    }

    /// The space `name` for this input, class count and width.
    pub fn build(&self, name: &str, cfg: &ZooConfig) -> Result<Box<dyn SearchSpace>> {
        let f = self.factories.get(name).ok_or_else(|| {
            NasError::Invalid(format!(
                "unknown search space `{name}` (known: {})",
                self.names().join(", ")
            ))
        })?;
        if !(cfg.width > 0.0 && cfg.width <= 8.0) {
            return Err(NasError::Invalid(format!(
                "width {} is out of range (0, 8]",
                cfg.width
            )));
        }
        let space = f(cfg)?;
        check_tokens(space.as_ref(), &space.initial())?;
        Ok(space)
    }
}

fn config_key(cfg: &ZooConfig) -> serde_json::Value {
    json!({"width": cfg.width, "input": cfg.input, "classes": cfg.classes})
}

/// Channel multipliers, cheapest first; 1.0 is the hand-made network.
const SCALES: [f64; 5] = [0.5, 0.75, 1.0, 1.25, 1.5];
const SCALE_ONE: usize = 2;

/// MobileNetV2 blocks, per stage: expansion (1, 2, 3, 4, 6), depthwise kernel (3, 5, 7),
/// output channels (0.5x to 1.5x the published ones, rounded to a multiple of 8), and
/// repeats (1 to one more than published). Stem, strides and head stay as published.
pub struct MobileNetV2Space {
    cfg: ZooConfig,
    base: Vec<V2Stage>,
}

const V2_EXPANSIONS: [usize; 5] = [1, 2, 3, 4, 6];
const KERNELS: [usize; 3] = [3, 5, 7];

impl MobileNetV2Space {
    pub fn new(cfg: ZooConfig) -> Result<Self> {
        let base = zoo::mobilenet_v2_stages(&cfg);
        Ok(MobileNetV2Space { cfg, base })
    }
}

impl SearchSpace for MobileNetV2Space {
    fn name(&self) -> String {
        "mobilenet_v2".into()
    }
    fn key(&self) -> serde_json::Value {
        config_key(&self.cfg)
    }
    fn tokens(&self) -> Vec<Token> {
        let mut t = Vec::new();
        for (i, st) in self.base.iter().enumerate() {
            let p = format!("stage{}", i + 1);
            t.push(Token::new(format!("{p}.expansion"), V2_EXPANSIONS));
            t.push(Token::new(format!("{p}.kernel"), KERNELS));
            t.push(Token::new(
                format!("{p}.channels"),
                SCALES.iter().map(|&s| scaled8(st.channels, s)),
            ));
            t.push(Token::new(format!("{p}.repeats"), 1..=st.repeats + 1));
        }
        t
    }
    fn initial(&self) -> Vec<usize> {
        self.base
            .iter()
            .flat_map(|st| {
                [
                    V2_EXPANSIONS
                        .iter()
                        .position(|&e| e == st.expansion)
                        .unwrap_or(0),
                    0,
                    SCALE_ONE,
                    st.repeats - 1,
                ]
            })
            .collect()
    }
    fn supernet_param(&self, tokens: &[usize], name: &str) -> String {
        // Blocks are numbered across stages: block k of a candidate is (stage, repeat), the
        // same (stage, repeat) of the supernet has another number.
        let Some(rest) = name.strip_prefix("block") else {
            return name.to_string();
        };
        let Some((num, tail)) = rest.split_once('.') else {
            return name.to_string();
        };
        let Ok(k) = num.parse::<usize>() else {
            return name.to_string();
        };
        let sup = self.supernet();
        let (mut first, mut sup_first) = (1, 1);
        for (t, s) in tokens.chunks(4).zip(sup.chunks(4)) {
            let (n, sn) = (t[3] + 1, s[3] + 1);
            if k < first + n {
                return format!("block{}.{tail}", sup_first + (k - first));
            }
            first += n;
            sup_first += sn;
        }
        name.to_string()
    }
    fn graph(&self, tokens: &[usize]) -> Result<Graph> {
        check_tokens(self, tokens)?;
        let stages: Vec<V2Stage> = self
            .base
            .iter()
            .zip(tokens.chunks(4))
            .map(|(st, t)| V2Stage {
                expansion: V2_EXPANSIONS[t[0]],
                kernel: KERNELS[t[1]],
                channels: scaled8(st.channels, SCALES[t[2]]),
                repeats: t[3] + 1,
                stride: st.stride,
            })
            .collect();
        Ok(zoo::mobilenet_v2_with(
            &self.cfg,
            zoo::v2_channels(&self.cfg, 32),
            &stages,
            zoo::mobilenet_v2_head(&self.cfg),
        )?)
    }
}

/// `c` times `s`, rounded to a multiple of 8 (at least 8); `c` itself at 1.0.
fn scaled8(c: usize, s: f64) -> usize {
    if s == 1.0 {
        return c;
    }
    let v = c as f64 * s;
    let mut n = (((v + 4.0) / 8.0).floor() as usize * 8).max(8);
    if (n as f64) < 0.9 * v {
        n += 8;
    }
    n
}

/// `c` times `s`, rounded, at least 1.
fn scaled(c: usize, s: f64) -> usize {
    ((c as f64 * s).round() as usize).max(1)
}

/// MobileNetV1 widths: the stem and each of the 13 depthwise-separable blocks take 0.5x to
/// 1.5x their published output channels.
pub struct MobileNetV1Space {
    cfg: ZooConfig,
}

impl MobileNetV1Space {
    pub fn new(cfg: ZooConfig) -> Result<Self> {
        Ok(MobileNetV1Space { cfg })
    }
    fn base(&self) -> Vec<usize> {
        std::iter::once(self.cfg.scale(32))
            .chain(
                zoo::MOBILENET_V1_BLOCKS
                    .iter()
                    .map(|&(c, _)| self.cfg.scale(c)),
            )
            .collect()
    }
}

impl SearchSpace for MobileNetV1Space {
    fn name(&self) -> String {
        "mobilenet_v1".into()
    }
    fn key(&self) -> serde_json::Value {
        config_key(&self.cfg)
    }
    fn tokens(&self) -> Vec<Token> {
        self.base()
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let name = if i == 0 {
                    "stem.channels".to_string()
                } else {
                    format!("block{i}.channels")
                };
                Token::new(name, SCALES.iter().map(|&s| scaled(c, s)))
            })
            .collect()
    }
    fn initial(&self) -> Vec<usize> {
        vec![SCALE_ONE; 1 + zoo::MOBILENET_V1_BLOCKS.len()]
    }
    fn graph(&self, tokens: &[usize]) -> Result<Graph> {
        check_tokens(self, tokens)?;
        let base = self.base();
        let ch: Vec<usize> = base
            .iter()
            .zip(tokens)
            .map(|(&c, &t)| scaled(c, SCALES[t]))
            .collect();
        let blocks: Vec<(usize, usize)> = ch[1..]
            .iter()
            .zip(zoo::MOBILENET_V1_BLOCKS.iter())
            .map(|(&c, &(_, s))| (c, s))
            .collect();
        Ok(zoo::mobilenet_v1_with(&self.cfg, ch[0], &blocks)?)
    }
}

/// ResNet depth and width with basic blocks: per stage, the number of blocks and the channels
/// (0.5x to 1.5x). Small inputs: ResNet-20's three stages, 1 to 9 blocks each; large inputs:
/// ResNet-18's four stages, 1 to 4 blocks each.
pub struct ResNetSpace {
    cfg: ZooConfig,
    base: Vec<ResStage>,
    max_blocks: usize,
}

impl ResNetSpace {
    pub fn new(cfg: ZooConfig) -> Result<Self> {
        let (base, max_blocks) = if cfg.small() {
            (zoo::resnet_cifar_stages(&cfg, 3), 9)
        } else {
            (zoo::resnet_imagenet_stages(&cfg, [2, 2, 2, 2]), 4)
        };
        Ok(ResNetSpace {
            cfg,
            base,
            max_blocks,
        })
    }
    fn stem(&self) -> usize {
        self.cfg.scale(if self.cfg.small() { 16 } else { 64 })
    }
}

impl SearchSpace for ResNetSpace {
    fn name(&self) -> String {
        "resnet".into()
    }
    fn key(&self) -> serde_json::Value {
        config_key(&self.cfg)
    }
    fn tokens(&self) -> Vec<Token> {
        let mut t = Vec::new();
        for (i, st) in self.base.iter().enumerate() {
            t.push(Token::new(
                format!("layer{}.blocks", i + 1),
                1..=self.max_blocks,
            ));
            t.push(Token::new(
                format!("layer{}.channels", i + 1),
                SCALES.iter().map(|&s| scaled(st.planes, s)),
            ));
        }
        t
    }
    fn initial(&self) -> Vec<usize> {
        self.base
            .iter()
            .flat_map(|st| [st.blocks - 1, SCALE_ONE])
            .collect()
    }
    fn graph(&self, tokens: &[usize]) -> Result<Graph> {
        check_tokens(self, tokens)?;
        let stages: Vec<ResStage> = self
            .base
            .iter()
            .zip(tokens.chunks(2))
            .map(|(st, t)| ResStage {
                planes: scaled(st.planes, SCALES[t[1]]),
                blocks: t[0] + 1,
                stride: st.stride,
            })
            .collect();
        Ok(zoo::resnet_with(&self.cfg, self.stem(), &stages, false)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use slim_core::analysis::analyze;

    #[test]
    fn the_initial_candidates_are_the_zoo_networks() {
        let spaces = Spaces::builtin();
        for (space, zoo_name, input) in [
            ("mobilenet_v2", "mobilenet_v2", [1, 28, 28]),
            ("mobilenet_v2", "mobilenet_v2", [3, 224, 224]),
            ("mobilenet_v1", "mobilenet_v1", [3, 32, 32]),
            ("resnet", "resnet20", [3, 32, 32]),
            ("resnet", "resnet18", [3, 224, 224]),
        ] {
            for width in [0.5, 1.0] {
                let cfg = ZooConfig::new(input).with_width(width);
                let s = spaces.build(space, &cfg).unwrap();
                let g = s.graph(&s.initial()).unwrap();
                let z = zoo::build(zoo_name, &cfg).unwrap();
                assert_eq!(g.to_def(), z.to_def(), "{space} {input:?} x{width}");
                assert_eq!(s.describe(&s.initial()), "initial");
            }
        }
    }

    #[test]
    fn choices_are_ordered_by_cost() {
        // Raising any one token of the initial candidate never lowers the MACs.
        let spaces = Spaces::builtin();
        let cfg = ZooConfig::new([1, 28, 28]).with_width(0.5);
        for name in spaces.names() {
            let s = spaces.build(&name, &cfg).unwrap();
            let ranges = s.ranges();
            let init = s.initial();
            for i in 0..ranges.len() {
                let mut prev = None;
                for v in 0..ranges[i] {
                    let mut t = init.clone();
                    t[i] = v;
                    let macs = analyze(&s.graph(&t).unwrap()).macs;
                    if let Some(p) = prev {
                        assert!(macs >= p, "{name} token {i} choice {v}: {macs} < {p}");
                    }
                    prev = Some(macs);
                }
            }
        }
    }

    #[test]
    fn bad_candidates_and_names_are_refused() {
        let spaces = Spaces::builtin();
        let cfg = ZooConfig::new([1, 28, 28]);
        let e = spaces.build("darts", &cfg).err().unwrap().to_string();
        assert!(e.contains("darts") && e.contains("mobilenet_v2"), "{e}");
        let s = spaces.build("resnet", &cfg).unwrap();
        let mut t = s.initial();
        t[1] = 99;
        let e = s.graph(&t).unwrap_err().to_string();
        assert!(e.contains("layer1.channels") && e.contains("99"), "{e}");
        let e = s.graph(&t[..3]).unwrap_err().to_string();
        assert!(e.contains("tokens"), "{e}");
        t[1] = 4;
        t[0] = 0;
        assert_eq!(
            s.describe(&t),
            "layer1.blocks=1 layer1.channels=24",
            "{:?}",
            s.tokens()[1]
        );
    }
}
