//! Image folders: the layout torchvision's `ImageFolder`, Keras and Paddle read.
//!
//! `DIR/CLASS/*` (classes sorted by name, images found at any depth under each class folder),
//! or `DIR/train/CLASS/*` beside `DIR/val/CLASS/*` (or `DIR/test/CLASS/*`) when the split is
//! given. Without one, a tenth of each class is held out for testing, chosen by a seeded
//! shuffle. PNG, JPEG, BMP and WebP files are decoded to one shape: the model's input when the
//! reader is told it ([`DataOptions::shape`]), else the size of the first training image and
//! its channels (grey, or RGB when it has colour). Each image is fitted to it straight from
//! its file: its shorter side resized (bilinear), then the centre cropped (the usual
//! evaluation transform).
//!
//! A folder whose decoded images fit in the cache ([`DataOptions::cache_mb`]) is decoded
//! once, in parallel, into memory, and every file is checked on the way. A larger one is read
//! from its files: only their headers are checked up front, and each batch is decoded in
//! parallel, on threads of its own, while the model works on the one before; a file that
//! stops decoding later is an error that names it.
//!
//! Hidden files (`.name`) are left alone; any other file that is not a decodable image is an
//! error that names it, as is a class folder without images, or a folder without class
//! folders.

use std::path::{Path, PathBuf};

use image::{DynamicImage, GenericImageView};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rayon::prelude::*;

use super::{DataOptions, Dataset, ImageSet, Normalize, Pixels};
use crate::error::{CoreError, Result};

/// The file endings read as images.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "webp"];

/// The fraction of each class held out for testing when the folder has no split.
pub const HELD_OUT: f64 = 0.1;

/// How many training images of a folder read from its files give the statistics that
/// normalize grey images (evenly spaced over the set).
pub const STATISTICS_SAMPLES: usize = 1000;

/// An image folder's train and test images, and what was found.
pub struct Folder {
    pub train: ImageSet,
    pub test: ImageSet,
    /// The class names, in label order.
    pub classes: Vec<String>,
    /// Whether the test images were held out of the training folder (no split on disk).
    pub held_out: bool,
    pub normalize: Normalize,
    /// Files left out with `skip_bad_images`, each with the reason.
    pub skipped: Vec<(PathBuf, String)>,
}

/// The files a folder reader has left out (`skip_bad_images`), or the first error when it
/// may not leave any out.
struct Skips<'a> {
    opts: &'a DataOptions,
    skipped: Vec<(PathBuf, String)>,
}

impl Skips<'_> {
    /// Leaves `e` (about `path`) out when bad images may be skipped, else returns it.
    fn skip(&mut self, path: &Path, e: CoreError) -> Result<()> {
        if !self.opts.skip_bad_images {
            return Err(e);
        }
        let why = match &e {
            CoreError::File { msg, .. } => msg.clone(),
            other => other.to_string(),
        };
        self.skipped.push((path.to_path_buf(), why));
        Ok(())
    }
}

/// The class folders of `dir` (sorted by name) and each one's image files (sorted by path).
fn list_classes(dir: &Path, skips: &mut Skips<'_>) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut classes = Vec::new();
    for entry in read_dir_sorted(dir)? {
        if entry.is_dir() {
            let name = file_name(&entry);
            if name.starts_with('.') {
                continue;
            }
            let mut files = Vec::new();
            collect_images(&entry, &mut files, skips)?;
            if files.is_empty() {
                return Err(CoreError::file(&entry, "a class folder without images"));
            }
            classes.push((name, files));
        }
    }
    if classes.is_empty() {
        return Err(CoreError::file(
            dir,
            "no class folders (an image folder holds DIR/CLASS/IMAGE, or DIR/train/CLASS/IMAGE and DIR/val/CLASS/IMAGE)",
        ));
    }
    if classes.len() > 256 {
        return Err(CoreError::file(
            dir,
            format!("{} classes; at most 256 are supported", classes.len()),
        ));
    }
    Ok(classes)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>> {
    let io = |source| CoreError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries = std::fs::read_dir(dir)
        .map_err(io)?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(io)?;
    entries.sort();
    Ok(entries)
}

/// Every image file under `dir`, at any depth, in path order.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>, skips: &mut Skips<'_>) -> Result<()> {
    for path in read_dir_sorted(dir)? {
        if file_name(&path).starts_with('.') {
            continue;
        }
        if path.is_dir() {
            collect_images(&path, out, skips)?;
            continue;
        }
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        if !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            let e = CoreError::file(
                &path,
                "not an image file (PNG, JPEG, BMP or WebP by its name)",
            );
            skips.skip(&path, e)?;
            continue;
        }
        out.push(path);
    }
    Ok(())
}

/// A reader of the image in `path`, its format guessed from its first bytes.
fn reader(path: &Path) -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
    image::ImageReader::open(path)
        .map_err(|source| CoreError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .with_guessed_format()
        .map_err(|e| undecodable(path, &e))
}

fn undecodable(path: &Path, e: &dyn std::fmt::Display) -> CoreError {
    CoreError::file(path, format!("cannot decode: {e}"))
}

fn decode(path: &Path) -> Result<DynamicImage> {
    reader(path)?.decode().map_err(|e| undecodable(path, &e))
}

/// The image in `path`, fitted to `shape` (see [`fit`]).
pub(crate) fn decode_fitted(path: &Path, shape: [usize; 3]) -> Result<Vec<u8>> {
    let img = decode(path)?;
    let mut out = vec![0u8; shape.iter().product()];
    fit(&img, shape, &mut out);
    Ok(out)
}

/// Checks that `path` holds an image whose header reads, without decoding its pixels.
fn check_header(path: &Path) -> Result<()> {
    let (w, h) = reader(path)?
        .into_dimensions()
        .map_err(|e| undecodable(path, &e))?;
    if w == 0 || h == 0 {
        return Err(CoreError::file(path, format!("an empty image ({w}x{h})")));
    }
    Ok(())
}

/// `img` with its shorter side resized to cover `h` x `w` and centre-cropped to it, written
/// into `out` as `c` (1: luma, 3: RGB) bytes per pixel, channel-major. The resize is
/// separable, with the triangle filter widened by the reduction where it shrinks (as Pillow's
/// and the `image` crate's bilinear resizes do), and only the pixels the crop keeps are
/// computed.
fn fit(img: &DynamicImage, [c, h, w]: [usize; 3], out: &mut [u8]) {
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let owned;
    let src: &[u8] = match (img, c) {
        (DynamicImage::ImageLuma8(b), 1) => b.as_raw(),
        (DynamicImage::ImageRgb8(b), 3) => b.as_raw(),
        (_, 1) => {
            owned = img.to_luma8().into_raw();
            &owned
        }
        _ => {
            owned = img.to_rgb8().into_raw();
            &owned
        }
    };
    if (ih, iw) == (h, w) {
        for (i, px) in src.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * h * w + i] = v;
            }
        }
        return;
    }
    let scale = (h as f64 / ih as f64).max(w as f64 / iw as f64);
    let sw = ((iw as f64 * scale).round() as usize).max(w);
    let sh = ((ih as f64 * scale).round() as usize).max(h);
    let xs = taps(iw, sw, (sw - w) / 2, w);
    let ys = taps(ih, sh, (sh - h) / 2, h);
    // Rows of the source that the crop reads, resampled along x first.
    let row0 = ys.iter().map(|t| t.0).min().unwrap_or(0);
    let row1 = ys.iter().map(|t| t.0 + t.1.len()).max().unwrap_or(0);
    let mut across = vec![0f32; (row1 - row0) * w * c];
    for (r, line) in across.chunks_exact_mut(w * c).enumerate() {
        let row = &src[(row0 + r) * iw * c..(row0 + r + 1) * iw * c];
        for (x, (start, weights)) in xs.iter().enumerate() {
            for ch in 0..c {
                let mut v = 0f32;
                for (k, &wt) in weights.iter().enumerate() {
                    v += wt * f32::from(row[(start + k) * c + ch]);
                }
                line[x * c + ch] = v;
            }
        }
    }
    for (y, (start, weights)) in ys.iter().enumerate() {
        for x in 0..w {
            for ch in 0..c {
                let mut v = 0f32;
                for (k, &wt) in weights.iter().enumerate() {
                    v += wt * across[((start - row0 + k) * w + x) * c + ch];
                }
                out[ch * h * w + y * w + x] = v.round().clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// For the output pixels `offset..offset + count` of an axis resized from `from` to `to`
/// pixels: the first source pixel each one reads and the weights of those it reads (a
/// triangle of radius 1, widened by `from / to` when shrinking; normalized).
fn taps(from: usize, to: usize, offset: usize, count: usize) -> Vec<(usize, Vec<f32>)> {
    let ratio = from as f64 / to as f64;
    let support = ratio.max(1.0);
    (offset..offset + count)
        .map(|o| {
            let centre = (o as f64 + 0.5) * ratio;
            let lo = ((centre - support).floor().max(0.0) as usize).min(from - 1);
            let hi = ((centre + support).ceil() as usize).clamp(lo + 1, from);
            let mut weights: Vec<f64> = (lo..hi)
                .map(|i| (1.0 - ((i as f64 + 0.5 - centre) / support).abs()).max(0.0))
                .collect();
            let sum: f64 = weights.iter().sum();
            if sum > 0.0 {
                weights.iter_mut().for_each(|v| *v /= sum);
            } else {
                weights = vec![0.0; hi - lo];
                weights[0] = 1.0;
            }
            (lo, weights.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Decodes `files` (with their labels) in parallel into one set of `shape`; a file that does
/// not decode is an error, or left out when `skips` allows it.
fn decode_all(
    files: &[(PathBuf, u8)],
    shape: [usize; 3],
    classes: usize,
    skips: &mut Skips<'_>,
) -> Result<ImageSet> {
    let per: usize = shape.iter().product();
    let bytes = files.len() * per;
    // Each image decoded straight into its place: one copy of the set in memory.
    let mut images = vec![0u8; bytes];
    let results: Vec<Result<()>> = images
        .par_chunks_mut(per.max(1))
        .zip(files.par_iter())
        .map(|(dst, (p, _))| decode(p).map(|img| fit(&img, shape, dst)))
        .collect();
    let mut labels = Vec::with_capacity(files.len());
    let mut kept = 0;
    for (i, (r, (path, label))) in results.into_iter().zip(files).enumerate() {
        match r {
            Ok(()) => {
                // Bad images before this one left gaps: move it down into the first free place.
                if kept != i {
                    images.copy_within(i * per..(i + 1) * per, kept * per);
                }
                labels.push(*label);
                kept += 1;
            }
            Err(e) => skips.skip(path, e)?,
        }
    }
    images.truncate(kept * per);
    Ok(ImageSet {
        shape,
        classes,
        images: images.into(),
        labels,
    })
}

/// `files` (with their labels) as a set read from its files at `shape`: each file's header is
/// checked (in parallel); one that does not read is an error, or left out when `skips`
/// allows it.
fn list_all(
    files: &[(PathBuf, u8)],
    shape: [usize; 3],
    classes: usize,
    skips: &mut Skips<'_>,
) -> Result<ImageSet> {
    let checked: Vec<Result<()>> = files.par_iter().map(|(p, _)| check_header(p)).collect();
    let (mut paths, mut labels) = (Vec::new(), Vec::new());
    for (r, (path, label)) in checked.into_iter().zip(files) {
        match r {
            Ok(()) => {
                paths.push(path.clone());
                labels.push(*label);
            }
            Err(e) => skips.skip(path, e)?,
        }
    }
    Ok(ImageSet {
        shape,
        classes,
        images: Pixels::Files(paths.into()),
        labels,
    })
}

/// Per-channel mean and standard deviation of a set's pixels on 0..1: of every image in
/// memory, or of [`STATISTICS_SAMPLES`] evenly spaced ones read from their files.
fn statistics(set: &ImageSet) -> Result<Normalize> {
    let [c, h, w] = set.shape;
    let n = set.len();
    let picked: Vec<usize> = if set.is_streamed() && n > STATISTICS_SAMPLES {
        (0..STATISTICS_SAMPLES)
            .map(|k| k * n / STATISTICS_SAMPLES)
            .collect()
    } else {
        (0..n).collect()
    };
    let images = super::fetch(set, &picked)?;
    let mut sums = vec![(0f64, 0f64, 0u64); c];
    for (img, _) in &images {
        for (ch, plane) in img.chunks_exact(h * w).enumerate() {
            for &p in plane {
                let v = f64::from(p) / 255.0;
                sums[ch].0 += v;
                sums[ch].1 += v * v;
                sums[ch].2 += 1;
            }
        }
    }
    let (mut mean, mut std) = (Vec::new(), Vec::new());
    for (s, q, n) in sums {
        let n = n.max(1) as f64;
        let m = s / n;
        mean.push(m as f32);
        std.push(((q / n - m * m).max(0.0).sqrt() as f32).max(1e-3));
    }
    Ok(Normalize { mean, std })
}

/// Reads a tree of images without labels (`unlabeled:DIR`): every image at any depth under
/// `dir`, sorted by path, a seeded tenth held out as the test split (for fidelity against the
/// original model). The sets have 0 classes and every label 0.
pub fn load_unlabeled(dir: &Path, opts: &DataOptions) -> Result<Folder> {
    opts.check()?;
    let mut skips = Skips {
        opts,
        skipped: Vec::new(),
    };
    let mut files = Vec::new();
    collect_images(dir, &mut files, &mut skips)?;
    if files.len() < 2 {
        return Err(CoreError::file(
            dir,
            format!(
                "holds {} image(s); label-free data needs at least 2 (one to train on, one to compare)",
                files.len()
            ),
        ));
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    files.shuffle(&mut rng);
    let k = ((files.len() as f64 * opts.val_fraction).round() as usize).clamp(1, files.len() - 1);
    let mut train = files.split_off(k);
    train.sort();
    files.sort();
    let unlabeled = |v: Vec<PathBuf>| v.into_iter().map(|f| (f, 0u8)).collect::<Vec<_>>();
    decode_folder(
        &unlabeled(train),
        &unlabeled(files),
        Vec::new(),
        true,
        skips,
    )
}

/// Reads an image folder (see the module's documentation).
pub fn load(dir: &Path, opts: &DataOptions) -> Result<Folder> {
    opts.check()?;
    let mut skips = Skips {
        opts,
        skipped: Vec::new(),
    };
    let train_dir = dir.join("train");
    let test_dir = ["val", "test"]
        .iter()
        .map(|n| dir.join(n))
        .find(|d| d.is_dir());
    let (classes, train_files, test_files, held_out) = match test_dir {
        Some(test_dir) if train_dir.is_dir() => {
            let train = list_classes(&train_dir, &mut skips)?;
            let test = list_classes(&test_dir, &mut skips)?;
            let names: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
            let mut test_files = Vec::new();
            for (name, files) in test {
                let Some(label) = names.iter().position(|n| *n == name) else {
                    return Err(CoreError::file(
                        test_dir.join(&name),
                        "a test class that the training folder does not have",
                    ));
                };
                test_files.extend(files.into_iter().map(|f| (f, label as u8)));
            }
            let train_files = train
                .into_iter()
                .enumerate()
                .flat_map(|(l, (_, files))| files.into_iter().map(move |f| (f, l as u8)))
                .collect::<Vec<_>>();
            (names, train_files, test_files, false)
        }
        _ => {
            let all = list_classes(dir, &mut skips)?;
            let names: Vec<String> = all.iter().map(|(n, _)| n.clone()).collect();
            let (mut train, mut test) = (Vec::new(), Vec::new());
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            for (l, (_, mut files)) in all.into_iter().enumerate() {
                files.shuffle(&mut rng);
                let k = if files.len() >= 2 {
                    ((files.len() as f64 * opts.val_fraction).round() as usize)
                        .clamp(1, files.len() - 1)
                } else {
                    0
                };
                let mut rest = files.split_off(k);
                rest.sort();
                files.sort();
                test.extend(files.into_iter().map(|f| (f, l as u8)));
                train.extend(rest.into_iter().map(|f| (f, l as u8)));
            }
            (names, train, test, true)
        }
    };
    decode_folder(&train_files, &test_files, classes, held_out, skips)
}

/// The size and channels of the first training image that decodes (the ones before it are
/// reported when the whole set is read).
fn first_shape(train_files: &[(PathBuf, u8)], opts: &DataOptions) -> Result<[usize; 3]> {
    let mut first_error = None;
    for (p, _) in train_files {
        match decode(p) {
            Ok(img) => {
                let (w, h) = img.dimensions();
                let channels = if img.color().has_color() { 3 } else { 1 };
                return Ok([channels, h as usize, w as usize]);
            }
            Err(e) if opts.skip_bad_images => {
                first_error.get_or_insert(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(first_error.unwrap_or_else(|| CoreError::Invalid("no training images".into())))
}

/// Reads a folder's train and test files (with their labels) at one shape (decoded into
/// memory, or read from the files: see the module's documentation), and chooses the
/// normalization: ImageNet's for colour, the training images' own statistics for grey.
fn decode_folder(
    train_files: &[(PathBuf, u8)],
    test_files: &[(PathBuf, u8)],
    classes: Vec<String>,
    held_out: bool,
    mut skips: Skips<'_>,
) -> Result<Folder> {
    let shape = match skips.opts.shape {
        Some(shape @ [1 | 3, h, w]) if h > 0 && w > 0 => shape,
        _ => first_shape(train_files, skips.opts)?,
    };
    let per: usize = shape.iter().product();
    let decoded = (train_files.len() + test_files.len()).saturating_mul(per);
    let in_memory = decoded <= skips.opts.cache_mb.saturating_mul(1 << 20);
    let read = if in_memory { decode_all } else { list_all };
    let train = read(train_files, shape, classes.len(), &mut skips)?;
    let test = read(test_files, shape, classes.len(), &mut skips)?;
    if train.labels.is_empty() || test.labels.is_empty() {
        return Err(CoreError::Invalid(format!(
            "{} training and {} test images are left after {} bad files were skipped",
            train.labels.len(),
            test.labels.len(),
            skips.skipped.len()
        )));
    }
    let normalize = if shape[0] == 3 {
        Normalize {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        }
    } else {
        statistics(&train)?
    };
    Ok(Folder {
        train,
        test,
        classes,
        held_out,
        normalize,
        skipped: skips.skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::imageops::FilterType;

    /// The fit as the `image` crate computes it: the image in `c` channels, resized whole (its
    /// bilinear filter), then cropped.
    fn by_the_image_crate(img: &DynamicImage, [c, h, w]: [usize; 3]) -> Vec<u8> {
        let img = &if c == 1 {
            DynamicImage::ImageLuma8(img.to_luma8())
        } else {
            DynamicImage::ImageRgb8(img.to_rgb8())
        };
        let (iw, ih) = img.dimensions();
        let scale = (h as f64 / f64::from(ih)).max(w as f64 / f64::from(iw));
        let sw = ((f64::from(iw) * scale).round() as u32).max(w as u32);
        let sh = ((f64::from(ih) * scale).round() as u32).max(h as u32);
        let resized = img.resize_exact(sw, sh, FilterType::Triangle);
        let (x0, y0) = ((sw - w as u32) / 2, (sh - h as u32) / 2);
        let crop = resized.crop_imm(x0, y0, w as u32, h as u32);
        let raw = if c == 1 {
            crop.to_luma8().into_raw()
        } else {
            crop.to_rgb8().into_raw()
        };
        let mut out = vec![0u8; c * h * w];
        for (i, px) in raw.chunks_exact(c).enumerate() {
            for (ch, &v) in px.iter().enumerate() {
                out[ch * h * w + i] = v;
            }
        }
        out
    }

    #[test]
    fn fitting_matches_the_image_crates_resize_within_a_level() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
        for file in ["rocket.jpg", "chelsea.png", "camera.png"] {
            let img = decode(&dir.join(file)).unwrap();
            for shape in [[3, 224, 224], [1, 100, 60], [3, 31, 97], [1, 700, 520]] {
                let mut got = vec![0u8; shape.iter().product()];
                fit(&img, shape, &mut got);
                let want = by_the_image_crate(&img, shape);
                let worst = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| a.abs_diff(*b))
                    .max()
                    .unwrap();
                let mean = got
                    .iter()
                    .zip(&want)
                    .map(|(a, b)| f64::from(a.abs_diff(*b)))
                    .sum::<f64>()
                    / got.len() as f64;
                assert!(
                    worst <= 1 && mean < 0.05,
                    "{file} at {shape:?}: {worst}, {mean}"
                );
            }
        }
    }
}
