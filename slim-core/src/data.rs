//! Data: image classification sets held in memory as bytes, their loaders, and batching.
//!
//! - [`ImageSet`]: `N` images of one shape `[C, H, W]` as `u8`, with their labels; it
//!   implements the [`Dataset`] trait.
//! - Loaders for MNIST-format IDX files (gzip or plain: MNIST and Fashion-MNIST) and CIFAR-10
//!   binary batches. A missing directory or file, a truncated file, a bad magic number, or
//!   labels that do not match the images is an error naming the file.
//! - A data spec string that every command accepts: `builtin:mnist-10k` (the 10,000-digit
//!   MNIST subset embedded in this crate), `mnist:DIR`, `fashion-mnist:DIR`, `cifar10:DIR`,
//!   and `images:DIR`, a folder of PNG, JPEG, BMP or WebP images in class folders
//!   ([`folder`]).
//! - [`Loader`]: seeded shuffling, normalization and augmentation (random crop with padding,
//!   horizontal flip), with batches prepared on a worker thread. The order and augmentation of
//!   epoch `e` depend only on the seed and `e`, so a run resumed at an epoch boundary sees the
//!   same batches as an unbroken one.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{rngs::StdRng, Rng, SeedableRng};
use rayon::prelude::*;

use crate::error::{CoreError, Result};

pub mod folder;

/// A labelled image classification set.
pub trait Dataset: Send + Sync {
    /// Number of samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Per-sample shape `[C, H, W]`.
    fn shape(&self) -> [usize; 3];
    /// Number of classes.
    fn classes(&self) -> usize;
    /// Whether samples are decoded from files when asked for (and worth asking for in
    /// parallel).
    fn streamed(&self) -> bool {
        false
    }
    /// The pixels (`C * H * W` bytes, channel-major) and label of sample `i`: borrowed when
    /// they are in memory, decoded from the sample's file otherwise (an error names a file
    /// that no longer decodes).
    fn sample(&self, i: usize) -> Result<(Cow<'_, [u8]>, u8)>;
}

/// Where the pixels of an [`ImageSet`] are.
#[derive(Clone, Debug, PartialEq)]
pub enum Pixels {
    /// Decoded in memory: `C * H * W` bytes per image, channel-major, image after image.
    Memory(Vec<u8>),
    /// One image file per sample, decoded and fitted to the set's shape whenever the sample
    /// is asked for: image folders larger than the decoded cache ([`DataOptions::cache_mb`]).
    Files(Arc<[PathBuf]>),
}

impl From<Vec<u8>> for Pixels {
    fn from(bytes: Vec<u8>) -> Self {
        Pixels::Memory(bytes)
    }
}

impl FromIterator<u8> for Pixels {
    fn from_iter<I: IntoIterator<Item = u8>>(bytes: I) -> Self {
        Pixels::Memory(bytes.into_iter().collect())
    }
}

impl Pixels {
    /// The decoded bytes, when they are in memory.
    pub fn as_memory(&self) -> Option<&[u8]> {
        match self {
            Pixels::Memory(b) => Some(b),
            Pixels::Files(_) => None,
        }
    }
}

/// Images and labels, decoded in memory or read from their files sample by sample.
#[derive(Clone, Debug)]
pub struct ImageSet {
    pub shape: [usize; 3],
    /// The number of classes; 0 for images without labels (`unlabeled:DIR`), whose labels
    /// are all 0 and mean nothing.
    pub classes: usize,
    pub images: Pixels,
    pub labels: Vec<u8>,
}

impl Dataset for ImageSet {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn shape(&self) -> [usize; 3] {
        self.shape
    }
    fn classes(&self) -> usize {
        self.classes
    }
    fn streamed(&self) -> bool {
        self.is_streamed()
    }
    fn sample(&self, i: usize) -> Result<(Cow<'_, [u8]>, u8)> {
        let n: usize = self.shape.iter().product();
        let pixels = match &self.images {
            Pixels::Memory(b) => Cow::Borrowed(&b[i * n..(i + 1) * n]),
            Pixels::Files(files) => Cow::Owned(folder::decode_fitted(&files[i], self.shape)?),
        };
        Ok((pixels, self.labels[i]))
    }
}

impl ImageSet {
    /// Whether the images carry labels (a set without classes does not).
    pub fn is_labeled(&self) -> bool {
        self.classes > 0
    }

    /// Whether the images are decoded from their files sample by sample.
    pub fn is_streamed(&self) -> bool {
        matches!(self.images, Pixels::Files(_))
    }

    /// A 64-bit fingerprint (16 hex digits) of the shape, classes, pixels and labels; for a
    /// set read from its files, of each file's path, length and modification time.
    pub fn fingerprint(&self) -> String {
        let mut h = crate::hash::Fnv::new();
        for d in self.shape {
            h.write(&(d as u64).to_le_bytes());
        }
        h.write(&(self.classes as u64).to_le_bytes());
        match &self.images {
            Pixels::Memory(b) => h.write(b),
            Pixels::Files(files) => {
                for f in files.iter() {
                    h.write(f.as_os_str().as_encoded_bytes());
                    let meta = std::fs::metadata(f).ok();
                    let len = meta.as_ref().map_or(0, |m| m.len());
                    let modified = meta
                        .and_then(|m| m.modified().ok())
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_nanos() as u64);
                    h.write(&len.to_le_bytes());
                    h.write(&modified.to_le_bytes());
                }
            }
        }
        h.write(&self.labels);
        format!("{:016x}", h.0)
    }

    /// Every image resized to `h` x `w` by bilinear interpolation (pixel centres aligned, as
    /// PIL and PyTorch's `align_corners=False` do), for models that expect another size. A set
    /// read from its files fits each file straight to the new size instead.
    pub fn resized(&self, h: usize, w: usize) -> ImageSet {
        let [c, ih, iw] = self.shape;
        if (ih, iw) == (h, w) || h == 0 || w == 0 {
            return self.clone();
        }
        let bytes = match &self.images {
            Pixels::Memory(b) => b,
            Pixels::Files(_) => {
                return ImageSet {
                    shape: [c, h, w],
                    ..self.clone()
                }
            }
        };
        // Source coordinate and weights along one axis, per output index.
        let axis = |out: usize, inp: usize| -> Vec<(usize, usize, f32)> {
            let scale = inp as f32 / out as f32;
            (0..out)
                .map(|o| {
                    let x = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
                    let x0 = (x.floor() as usize).min(inp - 1);
                    let x1 = (x0 + 1).min(inp - 1);
                    (x0, x1, x - x0 as f32)
                })
                .collect()
        };
        let (ys, xs) = (axis(h, ih), axis(w, iw));
        let n = self.len();
        let mut images = Vec::with_capacity(n * c * h * w);
        for img in bytes.chunks_exact(c * ih * iw) {
            for plane in img.chunks_exact(ih * iw) {
                for &(y0, y1, fy) in &ys {
                    for &(x0, x1, fx) in &xs {
                        let p = |y: usize, x: usize| f32::from(plane[y * iw + x]);
                        let top = p(y0, x0) * (1.0 - fx) + p(y0, x1) * fx;
                        let bottom = p(y1, x0) * (1.0 - fx) + p(y1, x1) * fx;
                        let v = top * (1.0 - fy) + bottom * fy;
                        images.push(v.round().clamp(0.0, 255.0) as u8);
                    }
                }
            }
        }
        ImageSet {
            shape: [c, h, w],
            classes: self.classes,
            images: images.into(),
            labels: self.labels.clone(),
        }
    }

    /// Every image with `c` channels: grey replicated into three, or colour taken to its luma
    /// (ITU-R BT.601 weights, as PIL's `convert("L")`); the same set where it has `c` already.
    /// A set read from its files decodes each file to `c` channels instead.
    pub fn with_channels(&self, c: usize) -> Result<ImageSet> {
        let [ic, h, w] = self.shape;
        let plane = h * w;
        if ic == c {
            return Ok(self.clone());
        }
        let bytes = match (&self.images, ic, c) {
            (Pixels::Files(_), 1 | 3, 1 | 3) => {
                return Ok(ImageSet {
                    shape: [c, h, w],
                    ..self.clone()
                })
            }
            (Pixels::Memory(b), _, _) => b,
            _ => &Vec::new(),
        };
        let images = match (ic, c) {
            (1, 3) => bytes
                .chunks_exact(plane)
                .flat_map(|p| p.iter().chain(p).chain(p))
                .copied()
                .collect(),
            (3, 1) => bytes
                .chunks_exact(3 * plane)
                .flat_map(|img| {
                    (0..plane).map(move |i| {
                        let [r, g, b] = [0, 1, 2].map(|k| f32::from(img[k * plane + i]));
                        (0.299 * r + 0.587 * g + 0.114 * b).round() as u8
                    })
                })
                .collect::<Vec<u8>>(),
            _ => {
                return Err(CoreError::Invalid(format!(
                    "images of {ic} channel(s) cannot be taken to {c}"
                )))
            }
        };
        Ok(ImageSet {
            shape: [c, h, w],
            classes: self.classes,
            images: images.into(),
            labels: self.labels.clone(),
        })
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let per: usize = self.shape.iter().product();
        let images = match &self.images {
            Pixels::Memory(b) => {
                let mut out = Vec::with_capacity(indices.len() * per);
                for &i in indices {
                    out.extend_from_slice(&b[i * per..(i + 1) * per]);
                }
                Pixels::Memory(out)
            }
            Pixels::Files(files) => {
                Pixels::Files(indices.iter().map(|&i| files[i].clone()).collect())
            }
        };
        ImageSet {
            shape: self.shape,
            classes: self.classes,
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
        }
    }

    /// The samples `start..end`.
    pub fn range(&self, start: usize, end: usize) -> ImageSet {
        let per: usize = self.shape.iter().product();
        let images = match &self.images {
            Pixels::Memory(b) => Pixels::Memory(b[start * per..end * per].to_vec()),
            Pixels::Files(files) => Pixels::Files(files[start..end].into()),
        };
        ImageSet {
            shape: self.shape,
            classes: self.classes,
            images,
            labels: self.labels[start..end].to_vec(),
        }
    }

    /// The last `n` samples (or all, if fewer).
    pub fn take_last(&self, n: usize) -> ImageSet {
        let n = n.min(self.len());
        self.range(self.len() - n, self.len())
    }

    /// The first `n` samples (or all, if fewer): a slice for quick tests.
    pub fn take(&self, n: usize) -> ImageSet {
        self.range(0, n.min(self.len()))
    }
}

/// Per-channel normalization `(x / 255 - mean) / std`.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// Training-time augmentation.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Augment {
    /// Pad by this many zero pixels, then crop back at a random offset (0: off).
    pub crop_padding: usize,
    /// Flip horizontally with probability 1/2.
    pub hflip: bool,
    /// Random resized crop (the usual training transform for photographs): a window of a
    /// random share of the image's area, from this share to all of it, with an aspect ratio
    /// between 3/4 and 4/3, resized (bilinear) back to the image's size. Takes the place of
    /// `crop_padding` when both are set.
    pub resized_crop: Option<f64>,
}

/// The smallest share of the area that [`Augment::images`]' random resized crop keeps, as
/// torchvision, Keras and Paddle do by default.
pub const RESIZED_CROP_MIN_SCALE: f64 = 0.08;

impl Augment {
    /// No augmentation.
    pub fn none() -> Augment {
        Augment::default()
    }

    /// The usual training augmentation for photographs (image folders): random resized crop
    /// and horizontal flip.
    pub fn images() -> Augment {
        Augment {
            crop_padding: 0,
            hflip: true,
            resized_crop: Some(RESIZED_CROP_MIN_SCALE),
        }
    }

    /// Parses `none`, or a comma-separated list of `flip`, `pad-crop:PIXELS` and
    /// `resized-crop[:MIN_SHARE]` (the share of the area kept at least, in (0, 1]; default
    /// 0.08).
    pub fn parse(text: &str) -> Result<Augment> {
        let mut a = Augment::none();
        if text.trim() == "none" {
            return Ok(a);
        }
        let bad = |part: &str, why: &str| {
            CoreError::Invalid(format!(
                "augmentation `{part}`: {why} (give none, or a list of flip, pad-crop:PIXELS, \
                 resized-crop[:MIN_SHARE])"
            ))
        };
        for part in text.split(',').map(str::trim) {
            let (name, value) = match part.split_once(':') {
                Some((n, v)) => (n, Some(v)),
                None => (part, None),
            };
            match (name, value) {
                ("flip", None) => a.hflip = true,
                ("pad-crop", Some(v)) => {
                    a.crop_padding = v
                        .parse()
                        .map_err(|_| bad(part, "the padding is a whole number of pixels"))?
                }
                ("resized-crop", v) => {
                    let s = match v {
                        None => RESIZED_CROP_MIN_SCALE,
                        Some(v) => v
                            .parse::<f64>()
                            .map_err(|_| bad(part, "the share is a number"))?,
                    };
                    if !(s > 0.0 && s <= 1.0) {
                        return Err(bad(part, "the share must be in (0, 1]"));
                    }
                    a.resized_crop = Some(s);
                }
                _ => return Err(bad(part, "unknown")),
            }
        }
        Ok(a)
    }
}

/// A data set's train and test splits, with the normalization and augmentation that suit it.
#[derive(Clone, Debug)]
pub struct DataSplits {
    /// The spec it was loaded from (`builtin:mnist-10k`, `cifar10:/data/cifar`, ...).
    pub spec: String,
    pub train: ImageSet,
    pub test: ImageSet,
    pub normalize: Normalize,
    pub augment: Augment,
    /// Image files left out (`DataOptions::skip_bad_images`), each with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// How image folders are read.
#[derive(Clone, Debug, PartialEq)]
pub struct DataOptions {
    /// The share of each class (of all images, without labels) held out for testing when a
    /// folder has no split of its own, in (0, 1).
    pub val_fraction: f64,
    /// Leave out files that are not images or do not decode (each reported) instead of
    /// refusing the folder.
    pub skip_bad_images: bool,
    /// The training augmentation, in place of the data set's own (none for MNIST-like sets,
    /// pad-crop and flip for CIFAR-10, [`Augment::images`] for image folders).
    pub augment: Option<Augment>,
    /// The decoded cache, in MiB: an image folder whose decoded images (both splits) fit in
    /// it is decoded once, in parallel, into memory; a larger one is read from its files,
    /// each batch decoded in parallel, on threads of its own, while the model trains on the
    /// one before.
    pub cache_mb: usize,
    /// The shape `[C, H, W]` to decode an image folder's images to (the model's input: each
    /// image fitted once, straight from its file); `None`: the first training image's size
    /// and colour.
    pub shape: Option<[usize; 3]>,
}

/// The default decoded cache, in MiB ([`DataOptions::cache_mb`]).
pub const DEFAULT_CACHE_MB: usize = 2048;

impl Default for DataOptions {
    fn default() -> Self {
        DataOptions {
            val_fraction: folder::HELD_OUT,
            skip_bad_images: false,
            augment: None,
            cache_mb: DEFAULT_CACHE_MB,
            shape: None,
        }
    }
}

impl DataOptions {
    /// Refuses a fraction outside (0, 1).
    pub fn check(&self) -> Result<()> {
        if self.val_fraction > 0.0 && self.val_fraction < 1.0 {
            Ok(())
        } else {
            Err(CoreError::Invalid(format!(
                "the held-out fraction {} is outside (0, 1)",
                self.val_fraction
            )))
        }
    }
}

const MNIST_TRAIN_IMAGES: &[u8] = include_bytes!("../data/mnist-10k/train-images-idx3-ubyte.gz");
const MNIST_TRAIN_LABELS: &[u8] = include_bytes!("../data/mnist-10k/train-labels-idx1-ubyte.gz");
const MNIST_TEST_IMAGES: &[u8] = include_bytes!("../data/mnist-10k/t10k-images-idx3-ubyte.gz");
const MNIST_TEST_LABELS: &[u8] = include_bytes!("../data/mnist-10k/t10k-labels-idx1-ubyte.gz");

/// The bundled default data spec.
pub const DEFAULT_SPEC: &str = "builtin:mnist-10k";

/// Loads a data set from a spec: `builtin:mnist-10k`, `mnist:DIR`, `fashion-mnist:DIR`,
/// `cifar10:DIR` or `images:DIR`.
pub fn load_spec(spec: &str) -> Result<DataSplits> {
    load_spec_with(spec, &DataOptions::default())
}

/// Loads a data spec, reading image folders as `opts` says.
pub fn load_spec_with(spec: &str, opts: &DataOptions) -> Result<DataSplits> {
    let (kind, arg) = spec.split_once(':').ok_or_else(|| {
        CoreError::Invalid(format!(
            "data spec `{spec}` is not KIND:ARG (builtin:mnist-10k, mnist:DIR, fashion-mnist:DIR, cifar10:DIR, images:DIR, unlabeled:DIR)"
        ))
    })?;
    let mnist_norm = Normalize {
        mean: vec![0.1307],
        std: vec![0.3081],
    };
    let mut skipped = Vec::new();
    let (train, test, normalize, augment) = match kind {
        "builtin" if arg == "mnist-10k" => {
            let p = |n: &str| PathBuf::from(format!("builtin:mnist-10k/{n}"));
            let train = idx_pair(
                (&p("train-images-idx3-ubyte.gz"), MNIST_TRAIN_IMAGES),
                (&p("train-labels-idx1-ubyte.gz"), MNIST_TRAIN_LABELS),
            )?;
            let test = idx_pair(
                (&p("t10k-images-idx3-ubyte.gz"), MNIST_TEST_IMAGES),
                (&p("t10k-labels-idx1-ubyte.gz"), MNIST_TEST_LABELS),
            )?;
            (train, test, mnist_norm, Augment::default())
        }
        "builtin" => {
            return Err(CoreError::Invalid(format!(
                "unknown built-in data set `{arg}` (known: mnist-10k)"
            )))
        }
        "mnist" | "fashion-mnist" => {
            let dir = existing_dir(arg)?;
            let train = load_idx_dir(&dir, "train")?;
            let test = load_idx_dir(&dir, "t10k")?;
            let norm = if kind == "mnist" {
                mnist_norm
            } else {
                Normalize { mean: vec![0.2860], std: vec![0.3530] }
            };
            (train, test, norm, Augment::default())
        }
        "cifar10" => {
            let dir = existing_dir(arg)?;
            let dir = if dir.join("cifar-10-batches-bin").is_dir() { dir.join("cifar-10-batches-bin") } else { dir };
            let train_files: Vec<PathBuf> = (1..=5).map(|i| dir.join(format!("data_batch_{i}.bin"))).collect();
            let train = load_cifar10(&train_files)?;
            let test = load_cifar10(&[dir.join("test_batch.bin")])?;
            let norm = Normalize { mean: vec![0.4914, 0.4822, 0.4465], std: vec![0.2470, 0.2435, 0.2616] };
            (train, test, norm, Augment { crop_padding: 4, hflip: true, resized_crop: None })
        }
        "images" => {
            let f = folder::load(&existing_dir(arg)?, opts)?;
            skipped = f.skipped;
            (f.train, f.test, f.normalize, Augment::images())
        }
        "unlabeled" => {
            let f = folder::load_unlabeled(&existing_dir(arg)?, opts)?;
            skipped = f.skipped;
            (f.train, f.test, f.normalize, Augment::images())
        }
        _ => {
            return Err(CoreError::Invalid(format!(
                "unknown data kind `{kind}` in `{spec}` (known: builtin, mnist, fashion-mnist, cifar10, images, unlabeled)"
            )))
        }
    };
    Ok(DataSplits {
        spec: spec.to_string(),
        train,
        test,
        normalize,
        augment: opts.augment.clone().unwrap_or(augment),
        skipped,
    })
}

fn existing_dir(arg: &str) -> Result<PathBuf> {
    let dir = PathBuf::from(arg);
    if dir.is_dir() {
        Ok(dir)
    } else {
        Err(CoreError::file(dir, "no such directory"))
    }
}

fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| CoreError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads `<prefix>-images-idx3-ubyte[.gz]` and `<prefix>-labels-idx1-ubyte[.gz]` from a
/// directory.
pub fn load_idx_dir(dir: &Path, prefix: &str) -> Result<ImageSet> {
    let find = |stem: &str| -> Result<PathBuf> {
        let plain = dir.join(stem);
        let gz = dir.join(format!("{stem}.gz"));
        if gz.is_file() {
            Ok(gz)
        } else if plain.is_file() {
            Ok(plain)
        } else {
            Err(CoreError::file(
                gz,
                "missing (neither it nor the uncompressed file exists)",
            ))
        }
    };
    let images = find(&format!("{prefix}-images-idx3-ubyte"))?;
    let labels = find(&format!("{prefix}-labels-idx1-ubyte"))?;
    idx_pair(
        (&images, &read_file(&images)?),
        (&labels, &read_file(&labels)?),
    )
}

fn idx_pair(images: (&Path, &[u8]), labels: (&Path, &[u8])) -> Result<ImageSet> {
    let (idims, ipix) = parse_idx(images.0, images.1, 3)?;
    let (ldims, lab) = parse_idx(labels.0, labels.1, 1)?;
    if idims[0] != ldims[0] {
        return Err(CoreError::file(
            labels.0,
            format!(
                "holds {} labels but {} holds {} images",
                ldims[0],
                images.0.display(),
                idims[0]
            ),
        ));
    }
    if let Some(bad) = lab.iter().find(|&&l| l >= 10) {
        return Err(CoreError::file(
            labels.0,
            format!("label {bad} is out of range 0..10"),
        ));
    }
    Ok(ImageSet {
        shape: [1, idims[1], idims[2]],
        classes: 10,
        images: ipix.into(),
        labels: lab,
    })
}

/// Largest file a loader will inflate: well above any IDX file of these data sets.
const MAX_BYTES: u64 = 1 << 31;

/// Parses an IDX file of unsigned bytes (gzip-compressed or not) with `rank` dimensions.
pub fn parse_idx(path: &Path, raw: &[u8], rank: usize) -> Result<(Vec<usize>, Vec<u8>)> {
    let bytes = if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw)
            .take(MAX_BYTES)
            .read_to_end(&mut out)
            .map_err(|e| CoreError::file(path, format!("corrupt gzip data: {e}")))?;
        out
    } else {
        raw.to_vec()
    };
    if bytes.len() < 4 + 4 * rank {
        return Err(CoreError::file(
            path,
            format!(
                "truncated: {} bytes, too short for an IDX header",
                bytes.len()
            ),
        ));
    }
    let magic = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let expected = 0x0800 + rank as u32;
    if magic != expected {
        return Err(CoreError::file(
            path,
            format!("bad magic number 0x{magic:08x}, expected 0x{expected:08x} (u8 data of rank {rank})"),
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let body = &bytes[4 + 4 * rank..];
    match count {
        Some(c) if c == body.len() && dims.iter().all(|&d| d > 0) => Ok((dims, body.to_vec())),
        _ => Err(CoreError::file(
            path,
            format!(
                "truncated or oversized: header says {dims:?}, file holds {} data bytes",
                body.len()
            ),
        )),
    }
}

/// Reads CIFAR-10 binary batches (records of one label byte and 3x32x32 pixels).
pub fn load_cifar10(files: &[PathBuf]) -> Result<ImageSet> {
    const REC: usize = 1 + 3 * 32 * 32;
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for f in files {
        let bytes = read_file(f)?;
        if bytes.is_empty() || bytes.len() % REC != 0 {
            return Err(CoreError::file(
                f,
                format!(
                    "{} bytes is not a whole number of {REC}-byte CIFAR-10 records",
                    bytes.len()
                ),
            ));
        }
        for rec in bytes.chunks_exact(REC) {
            if rec[0] >= 10 {
                return Err(CoreError::file(
                    f,
                    format!("label {} is out of range 0..10", rec[0]),
                ));
            }
            labels.push(rec[0]);
            images.extend_from_slice(&rec[1..]);
        }
    }
    Ok(ImageSet {
        shape: [3, 32, 32],
        classes: 10,
        images: images.into(),
        labels,
    })
}

/// One batch: normalized images `[B, C, H, W]` f32, labels `[B]` u32, and the index of every
/// sample in its data set (knowledge precomputed per sample is looked up by it).
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub indices: Vec<usize>,
}

/// How a [`Loader`] walks a data set.
#[derive(Clone, Debug)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// Shuffle with this seed (mixed with the epoch); `None` keeps the stored order.
    pub shuffle: Option<u64>,
    pub augment: Augment,
    pub normalize: Normalize,
    /// Drop a last batch smaller than `batch_size` (training), or keep it (evaluation).
    pub drop_last: bool,
}

impl LoaderConfig {
    /// Training batches of `data`'s training split: shuffled with `seed`, augmented and
    /// normalized as the data says, a last incomplete batch dropped.
    pub fn training(data: &DataSplits, batch_size: usize, seed: u64) -> Self {
        LoaderConfig {
            batch_size,
            shuffle: Some(seed),
            augment: data.augment.clone(),
            normalize: data.normalize.clone(),
            drop_last: true,
        }
    }
}

/// A batch as the loader's thread prepares it: images, labels, sample indices.
type Prepared = (Vec<f32>, Vec<u32>, Vec<usize>);

/// Batches of one epoch, prepared on a worker thread two batches ahead.
pub struct Loader {
    rx: mpsc::Receiver<Result<Prepared>>,
    shape: [usize; 3],
    device: Device,
    batches: usize,
}

impl Loader {
    pub fn new(
        data: Arc<dyn Dataset>,
        cfg: &LoaderConfig,
        epoch: u64,
        device: &Device,
    ) -> Result<Loader> {
        if cfg.batch_size == 0 {
            return Err(CoreError::Invalid("batch size must be at least 1".into()));
        }
        let n = data.len();
        let order = epoch_order(n, cfg, epoch);
        let batches = if cfg.drop_last {
            n / cfg.batch_size
        } else {
            n.div_ceil(cfg.batch_size)
        };
        let (tx, rx) = mpsc::sync_channel(2);
        let cfg = cfg.clone();
        let shape = data.shape();
        std::thread::spawn(move || {
            for b in 0..batches {
                let idx = &order[b * cfg.batch_size..((b + 1) * cfg.batch_size).min(n)];
                let mut rng =
                    StdRng::seed_from_u64(mix(cfg.shuffle.unwrap_or(0), epoch, b as u64 + 1));
                let batch = make_batch(data.as_ref(), idx, &cfg, &mut rng)
                    .map(|(x, y)| (x, y, idx.to_vec()));
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return; // the consumer stopped early, or a sample did not decode
                }
            }
        });
        Ok(Loader {
            rx,
            shape,
            device: device.clone(),
            batches,
        })
    }

    /// Number of batches in the epoch.
    pub fn len(&self) -> usize {
        self.batches
    }
    pub fn is_empty(&self) -> bool {
        self.batches == 0
    }
}

impl Iterator for Loader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Self::Item> {
        let (x, y, indices) = match self.rx.recv().ok()? {
            Ok(batch) => batch,
            Err(e) => return Some(Err(e)),
        };
        let b = y.len();
        let [c, h, w] = self.shape;
        let make = || -> Result<Batch> {
            Ok(Batch {
                images: Tensor::from_vec(x, (b, c, h, w), &self.device)?,
                labels: Tensor::from_vec(y, b, &self.device)?,
                indices,
            })
        };
        Some(make())
    }
}

/// The order in which a [`Loader`] visits `n` samples in `epoch`.
fn epoch_order(n: usize, cfg: &LoaderConfig, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if let Some(seed) = cfg.shuffle {
        order.shuffle(&mut StdRng::seed_from_u64(mix(seed, epoch, 0)));
    }
    order
}

/// The sample indices of every batch a [`Loader`] yields for `n` samples in `epoch`, in
/// order: what a term that fetches per-sample data from elsewhere asks for ahead of use.
pub fn epoch_plan(n: usize, cfg: &LoaderConfig, epoch: u64) -> Vec<Vec<usize>> {
    if cfg.batch_size == 0 {
        return Vec::new();
    }
    let order = epoch_order(n, cfg, epoch);
    let mut plan: Vec<Vec<usize>> = order
        .chunks(cfg.batch_size)
        .map(<[usize]>::to_vec)
        .collect();
    if cfg.drop_last && plan.last().is_some_and(|b| b.len() < cfg.batch_size) {
        plan.pop();
    }
    plan
}

/// Mixes a seed with an epoch and a batch index into an independent seed.
pub(crate) fn mix(seed: u64, epoch: u64, batch: u64) -> u64 {
    let mut h = seed ^ 0x9e37_79b9_7f4a_7c15;
    for v in [epoch, batch] {
        h = (h ^ v).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    h
}

fn make_batch(
    data: &dyn Dataset,
    idx: &[usize],
    cfg: &LoaderConfig,
    rng: &mut StdRng,
) -> Result<(Vec<f32>, Vec<u32>)> {
    let [c, h, w] = data.shape();
    let per = c * h * w;
    let mut xs = vec![0f32; idx.len() * per];
    let mut ys = Vec::with_capacity(idx.len());
    // Lookup tables: byte -> normalized value, per channel.
    let lut: Vec<[f32; 256]> = (0..c)
        .map(|ch| {
            let mean = cfg
                .normalize
                .mean
                .get(ch)
                .or(cfg.normalize.mean.first())
                .copied()
                .unwrap_or(0.0);
            let std = cfg
                .normalize
                .std
                .get(ch)
                .or(cfg.normalize.std.first())
                .copied()
                .unwrap_or(1.0);
            std::array::from_fn(|v| (v as f32 / 255.0 - mean) / std)
        })
        .collect();
    let pad = cfg.augment.crop_padding as i64;
    // Samples read from files decode in parallel; the augmentation draws stay in order.
    let samples = fetch(data, idx)?;
    for (bi, (pix, label)) in samples.into_iter().enumerate() {
        let pix = &pix[..];
        ys.push(u32::from(label));
        if let Some(min_share) = cfg.augment.resized_crop {
            let window = crop_window(h, w, min_share, rng);
            let flip = cfg.augment.hflip && rng.random::<bool>();
            let out = &mut xs[bi * per..(bi + 1) * per];
            resized_crop(pix, [c, h, w], window, flip, &lut, out);
            continue;
        }
        let (dy, dx) = if pad > 0 {
            (rng.random_range(-pad..=pad), rng.random_range(-pad..=pad))
        } else {
            (0, 0)
        };
        let flip = cfg.augment.hflip && rng.random::<bool>();
        let out = &mut xs[bi * per..(bi + 1) * per];
        for ch in 0..c {
            let zero = lut[ch][0];
            for y in 0..h {
                for x in 0..w {
                    let sx = if flip { w - 1 - x } else { x } as i64 + dx;
                    let sy = y as i64 + dy;
                    let v = if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                        lut[ch][pix[ch * h * w + sy as usize * w + sx as usize] as usize]
                    } else {
                        zero
                    };
                    out[ch * h * w + y * w + x] = v;
                }
            }
        }
    }
    Ok((xs, ys))
}

/// The samples `idx` of `data`: decoded in parallel on the decoders' own threads when they
/// come from files. Not on the global pool: its threads may be waiting for this very batch
/// (an evaluation inside a parallel sensitivity analysis), and would never take the work.
pub(crate) fn fetch<'d>(data: &'d dyn Dataset, idx: &[usize]) -> Result<Vec<(Cow<'d, [u8]>, u8)>> {
    static DECODERS: std::sync::OnceLock<Option<rayon::ThreadPool>> = std::sync::OnceLock::new();
    let pool = DECODERS.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(rayon::current_num_threads())
            .thread_name(|i| format!("slim-decode-{i}"))
            .build()
            .ok()
    });
    match pool {
        Some(pool) if data.streamed() => {
            pool.install(|| idx.par_iter().map(|&i| data.sample(i)).collect())
        }
        _ => idx.iter().map(|&i| data.sample(i)).collect(),
    }
}

/// A random window `(top, left, height, width)` of an `h` x `w` image for a random resized
/// crop: a share of the area in `[min_share, 1]` and an aspect ratio (width / height) in
/// [3/4, 4/3], drawn log-uniformly; after ten windows that do not fit, the whole image.
fn crop_window(h: usize, w: usize, min_share: f64, rng: &mut StdRng) -> (f64, f64, f64, f64) {
    let area = (h * w) as f64;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let share = rng.random_range(min_share..=1.0);
        let ratio = rng.random_range(lo..=hi).exp();
        let cw = (area * share * ratio).sqrt().round();
        let ch = (area * share / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w as f64 && ch <= h as f64 {
            let top = rng.random_range(0..=(h - ch as usize)) as f64;
            let left = rng.random_range(0..=(w - cw as usize)) as f64;
            return (top, left, ch, cw);
        }
    }
    (0.0, 0.0, h as f64, w as f64)
}

/// Writes the window `(top, left, height, width)` of the image `pix` (`[c, h, w]` bytes),
/// resized to `h` x `w` with bilinear sampling (pixel centres aligned, edges clamped to the
/// window) and flipped when asked, normalized through `lut`, into `out`.
fn resized_crop(
    pix: &[u8],
    [c, h, w]: [usize; 3],
    (top, left, ch, cw): (f64, f64, f64, f64),
    flip: bool,
    lut: &[[f32; 256]],
    out: &mut [f32],
) {
    // Source coordinate of an output pixel along one axis: its two neighbours and the
    // weight of the second.
    let axis = |n: usize, start: f64, len: f64| -> Vec<(usize, usize, f32)> {
        (0..n)
            .map(|o| {
                let s = (start + (o as f64 + 0.5) * len / n as f64 - 0.5)
                    .clamp(start, start + len - 1.0);
                let a = s.floor() as usize;
                let b = (a + 1).min((start + len - 1.0) as usize);
                (a, b, (s - a as f64) as f32)
            })
            .collect()
    };
    let ys = axis(h, top, ch);
    let xs = axis(w, left, cw);
    for ch_i in 0..c {
        let plane = &pix[ch_i * h * w..(ch_i + 1) * h * w];
        let t = &lut[ch_i];
        for (y, &(y0, y1, fy)) in ys.iter().enumerate() {
            for x in 0..w {
                let (x0, x1, fx) = xs[if flip { w - 1 - x } else { x }];
                let v = |yy: usize, xx: usize| f32::from(plane[yy * w + xx]);
                let top_row = v(y0, x0) * (1.0 - fx) + v(y0, x1) * fx;
                let bottom_row = v(y1, x0) * (1.0 - fx) + v(y1, x1) * fx;
                let value = top_row * (1.0 - fy) + bottom_row * fy;
                // The lookup table maps bytes; interpolate between its two nearest entries.
                let lo = value.floor().clamp(0.0, 255.0) as usize;
                let hi = (lo + 1).min(255);
                let f = value - lo as f32;
                out[ch_i * h * w + y * w + x] = t[lo] * (1.0 - f) + t[hi] * f;
            }
        }
    }
}

#[cfg(test)]
mod tests {

    /// The normalization table of `mean` 0, `std` 1: byte / 255.
    fn unit_lut() -> Vec<[f32; 256]> {
        vec![std::array::from_fn(|v| v as f32 / 255.0)]
    }

    #[test]
    fn a_resized_crop_is_the_window_resized_as_image_sets_resize() {
        // 6x6 image of distinct bytes; the window rows 1..4, columns 2..6 (3 x 4), brought
        // back to 6x6, against ImageSet::resized of the window cut out by hand.
        let pix: Vec<u8> = (0..36u8).map(|v| v * 7).collect();
        let mut window = Vec::new();
        for y in 1..4 {
            window.extend_from_slice(&pix[y * 6 + 2..y * 6 + 6]);
        }
        let cut = ImageSet {
            shape: [1, 3, 4],
            classes: 1,
            images: window.into(),
            labels: vec![0],
        }
        .resized(6, 6);
        for flip in [false, true] {
            let mut out = vec![0f32; 36];
            resized_crop(
                &pix,
                [1, 6, 6],
                (1.0, 2.0, 3.0, 4.0),
                flip,
                &unit_lut(),
                &mut out,
            );
            for y in 0..6 {
                for x in 0..6 {
                    let want = f32::from(
                        cut.images.as_memory().unwrap()[y * 6 + if flip { 5 - x } else { x }],
                    );
                    let got = out[y * 6 + x] * 255.0;
                    // ImageSet::resized rounds to bytes.
                    assert!(
                        (got - want).abs() <= 0.5,
                        "flip {flip} ({y}, {x}): {got} vs {want}"
                    );
                }
            }
        }
        // The whole image as the window is the image itself.
        let mut out = vec![0f32; 36];
        resized_crop(
            &pix,
            [1, 6, 6],
            (0.0, 0.0, 6.0, 6.0),
            false,
            &unit_lut(),
            &mut out,
        );
        for (o, p) in out.iter().zip(&pix) {
            assert!((o * 255.0 - f32::from(*p)).abs() < 1e-3);
        }
    }

    #[test]
    fn crop_windows_keep_their_share_and_aspect_inside_the_image() {
        let mut rng = StdRng::seed_from_u64(3);
        let (h, w) = (96usize, 128usize);
        let mut smallest = 1.0f64;
        for _ in 0..2000 {
            let (top, left, ch, cw) = crop_window(h, w, 0.08, &mut rng);
            assert!(top + ch <= h as f64 && left + cw <= w as f64);
            let share = ch * cw / (h * w) as f64;
            assert!(share > 0.07 && share <= 1.0, "{share}");
            let ratio = cw / ch;
            let whole = (ch, cw) == (h as f64, w as f64);
            assert!(whole || (0.7..=1.4).contains(&ratio), "{ratio}");
            smallest = smallest.min(share);
        }
        assert!(smallest < 0.1, "the small windows are drawn: {smallest}");
    }

    #[test]
    fn augmentation_parses_and_refuses_by_name() {
        assert_eq!(Augment::parse("none").unwrap(), Augment::none());
        let a = Augment::parse("flip, resized-crop:0.25").unwrap();
        assert!(a.hflip && a.resized_crop == Some(0.25) && a.crop_padding == 0);
        assert_eq!(
            Augment::parse("resized-crop,flip").unwrap(),
            Augment::images()
        );
        assert_eq!(Augment::parse("pad-crop:4").unwrap().crop_padding, 4);
        for bad in [
            "rotate",
            "resized-crop:0",
            "resized-crop:1.5",
            "pad-crop:x",
            "flip:2",
        ] {
            let e = Augment::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn resize_is_bilinear_with_aligned_pixel_centres() {
        let set = ImageSet {
            shape: [1, 2, 2],
            classes: 2,
            images: vec![0, 100, 200, 255].into(),
            labels: vec![1],
        };
        let r = set.resized(4, 4);
        assert_eq!(r.shape, [1, 4, 4]);
        // Output pixel o samples the input at (o + 0.5) / 2 - 0.5: -0.25 (clamped), 0.25,
        // 0.75, 1.25 (clamped to the last pixel).
        assert_eq!(&r.images.as_memory().unwrap()[..4], &[0, 25, 75, 100]);
        assert_eq!(&r.images.as_memory().unwrap()[12..], &[200, 214, 241, 255]);
        // Between rows 0 and 1 at a quarter: 0.75 * top + 0.25 * bottom.
        assert_eq!(r.images.as_memory().unwrap()[4], 50);
        assert_eq!(r.labels, set.labels);
        // Down to one pixel: the centre, the mean of the four.
        assert_eq!(set.resized(1, 1).images, vec![139].into());
        assert_eq!(set.resized(2, 2).images, set.images);
    }

    use super::*;

    #[test]
    fn builtin_mnist_loads() {
        let d = load_spec(DEFAULT_SPEC).unwrap();
        assert_eq!(d.train.len(), 8004);
        assert_eq!(d.test.len(), 1996);
        assert_eq!(d.train.shape, [1, 28, 28]);
        let mut counts = [0usize; 10];
        for &l in &d.train.labels {
            counts[l as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 600), "{counts:?}");
    }

    #[test]
    fn bad_specs_and_files() {
        for (spec, needle) in [
            ("mnist", "KIND:ARG"),
            ("builtin:cifar", "mnist-10k"),
            ("imagenet:/x", "unknown data kind"),
            ("mnist:/no/such/dir", "/no/such/dir"),
        ] {
            let e = load_spec(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
        let p = Path::new("f.idx");
        let mut ok = vec![0, 0, 8, 1, 0, 0, 0, 3, 1, 2, 3];
        assert_eq!(parse_idx(p, &ok, 1).unwrap().1, vec![1, 2, 3]);
        ok.pop();
        assert!(parse_idx(p, &ok, 1)
            .unwrap_err()
            .to_string()
            .contains("truncated"));
        let e = parse_idx(p, &[0, 0, 8, 3, 0, 0, 0, 1], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("f.idx") && e.contains("magic"), "{e}");
        let e = parse_idx(p, &[0x1f, 0x8b, 1, 2, 3], 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("gzip"), "{e}");
    }

    #[test]
    fn loader_is_seeded_and_complete() {
        let d = load_spec(DEFAULT_SPEC).unwrap().test.take(100);
        let data: Arc<dyn Dataset> = Arc::new(d);
        let cfg = LoaderConfig {
            batch_size: 32,
            shuffle: Some(5),
            augment: Augment {
                crop_padding: 2,
                hflip: true,
                resized_crop: None,
            },
            normalize: Normalize {
                mean: vec![0.5],
                std: vec![0.5],
            },
            drop_last: false,
        };
        let labels = |epoch| -> Vec<u32> {
            Loader::new(data.clone(), &cfg, epoch, &Device::Cpu)
                .unwrap()
                .flat_map(|b| b.unwrap().labels.to_vec1::<u32>().unwrap())
                .collect()
        };
        let (a, b, c) = (labels(0), labels(0), labels(1));
        assert_eq!(a.len(), 100);
        // The plan names the batches the loader yields, in order.
        for (epoch, drop_last) in [(0, false), (1, true)] {
            let cfg = LoaderConfig {
                drop_last,
                ..cfg.clone()
            };
            let got: Vec<Vec<usize>> = Loader::new(data.clone(), &cfg, epoch, &Device::Cpu)
                .unwrap()
                .map(|b| b.unwrap().indices)
                .collect();
            assert_eq!(got, epoch_plan(100, &cfg, epoch));
            assert_eq!(got.len(), if drop_last { 3 } else { 4 });
        }
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted_a = a.clone();
        let mut sorted_c = c.clone();
        sorted_a.sort();
        sorted_c.sort();
        assert_eq!(sorted_a, sorted_c);
        let first = Loader::new(data.clone(), &cfg, 0, &Device::Cpu)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(first.images.dims(), &[32, 1, 28, 28]);
        let v = first
            .images
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
    }
}
