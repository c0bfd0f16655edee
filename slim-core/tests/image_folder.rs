//! Image folders (`images:DIR`), written by the tests from the bundled digits: PNG reads back
//! the IDX pixels exactly, JPEG closely; the split on disk or held out; colour images of
//! several sizes brought to one; bad files named; and LeNet trained from a PNG folder as
//! from the IDX files; real photographs decode as Pillow decodes them.

use std::path::Path;

use candle_core::Device;
use slim_core::data::{load_spec, Augment, Dataset, ImageSet, DEFAULT_SPEC};
use slim_core::train::{evaluate, train, TrainConfig};
use slim_core::zoo::{self, ZooConfig};

/// Writes each image of `set` as `dir/<label>/<index>.<ext>`.
fn write_folder(set: &ImageSet, dir: &Path, ext: &str) {
    for i in 0..set.len() {
        let (px, label) = set.sample(i).unwrap();
        let class = dir.join(label.to_string());
        std::fs::create_dir_all(&class).unwrap();
        let img = image::GrayImage::from_raw(28, 28, px.to_vec()).unwrap();
        let path = class.join(format!("{i:05}.{ext}"));
        if ext == "jpg" {
            let file = std::fs::File::create(&path).unwrap();
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(file, 95);
            enc.encode_image(&img).unwrap();
        } else {
            img.save(&path).unwrap();
        }
    }
}

/// `set`'s images in the order a folder lists them: by class, then by index.
fn by_class(set: &ImageSet) -> Vec<(Vec<u8>, u8)> {
    let mut v: Vec<(u8, usize)> = (0..set.len())
        .map(|i| (set.sample(i).unwrap().1, i))
        .collect();
    v.sort();
    v.into_iter()
        .map(|(l, i)| (set.sample(i).unwrap().0.to_vec(), l))
        .collect()
}

fn spec(dir: &Path) -> String {
    format!("images:{}", dir.display())
}

#[test]
fn png_folders_read_back_the_idx_pixels_and_jpeg_ones_come_close() {
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let (train, test) = (idx.train.take(300), idx.test.take(100));
    for ext in ["png", "jpg"] {
        let dir = tempfile::tempdir().unwrap();
        write_folder(&train, &dir.path().join("train"), ext);
        write_folder(&test, &dir.path().join("val"), ext);
        let d = load_spec(&spec(dir.path())).unwrap();
        assert_eq!(d.train.shape, [1, 28, 28]);
        assert_eq!((d.train.len(), d.test.len()), (300, 100));
        assert_eq!(d.train.classes, 10);
        for (set, want) in [(&d.train, &train), (&d.test, &test)] {
            let want = by_class(want);
            let mut worst = 0f64;
            for (i, (px, label)) in want.iter().enumerate() {
                let (got, l) = set.sample(i).unwrap();
                assert_eq!(l, *label);
                let diff = got
                    .iter()
                    .zip(px)
                    .map(|(a, b)| f64::from(a.abs_diff(*b)))
                    .sum::<f64>()
                    / px.len() as f64;
                worst = worst.max(diff);
            }
            if ext == "png" {
                assert_eq!(worst, 0.0, "PNG is lossless");
            } else {
                assert!(worst < 4.0, "JPEG at quality 95: {worst} levels on average");
            }
        }
        // Grey images: normalized by the training images' own statistics.
        assert_eq!(d.normalize.mean.len(), 1);
        assert!(
            (d.normalize.mean[0] - 0.13).abs() < 0.02,
            "{:?}",
            d.normalize
        );
    }
}

#[test]
fn without_a_split_a_tenth_of_each_class_is_held_out_the_same_way_every_time() {
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let set = idx.train.take(500);
    let dir = tempfile::tempdir().unwrap();
    write_folder(&set, dir.path(), "png");
    let a = load_spec(&spec(dir.path())).unwrap();
    let b = load_spec(&spec(dir.path())).unwrap();
    assert_eq!(a.train.len() + a.test.len(), 500);
    assert_eq!(a.train.fingerprint(), b.train.fingerprint());
    assert_eq!(a.test.fingerprint(), b.test.fingerprint());
    for class in 0..10u8 {
        let n = set.labels.iter().filter(|&&l| l == class).count();
        let held = a.test.labels.iter().filter(|&&l| l == class).count();
        let want = ((n as f64 * 0.1).round() as usize).max(1);
        assert_eq!(held, want, "class {class}: {held} of {n} held out");
    }
    // No image is in both splits.
    let per = 28 * 28;
    let train: std::collections::HashSet<&[u8]> =
        a.train.images.as_memory().unwrap().chunks(per).collect();
    let shared = a
        .test
        .images
        .as_memory()
        .unwrap()
        .chunks(per)
        .filter(|t| train.contains(t))
        .count();
    assert_eq!(shared, 0);
}

#[test]
fn colour_images_of_several_sizes_come_to_the_first_ones_size() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [(32, 32), (48, 40), (20, 64), (32, 32)];
    for (i, (w, h)) in sizes.iter().enumerate() {
        let class = dir.path().join(["cat", "dog"][i % 2]);
        std::fs::create_dir_all(&class).unwrap();
        let img = image::RgbImage::from_fn(*w, *h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 128])
        });
        img.save(class.join(format!("{i}.png"))).unwrap();
        img.save(class.join(format!("{i}.bmp"))).unwrap();
    }
    let d = load_spec(&spec(dir.path())).unwrap();
    assert_eq!(d.train.shape, [3, 32, 32]);
    assert_eq!(d.train.len() + d.test.len(), 8);
    assert_eq!(d.normalize.mean, vec![0.485, 0.456, 0.406]);
    // Centre crops of gradients: every image's blue plane is 128, and its red one rises from
    // left to right.
    for set in [&d.train, &d.test] {
        for i in 0..set.len() {
            let px = set.sample(i).unwrap().0;
            assert!(px[2 * 1024..].iter().all(|&b| b.abs_diff(128) <= 1));
            assert!(px[31] > px[0] + 100, "{:?}", &px[..32]);
        }
    }
}

#[test]
fn bad_files_and_folders_are_refused_by_name() {
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let set = idx.train.take(40);
    let check = |prepare: &dyn Fn(&Path), needle: &str| {
        let dir = tempfile::tempdir().unwrap();
        write_folder(&set, dir.path(), "png");
        prepare(dir.path());
        let err = load_spec(&spec(dir.path()))
            .err()
            .expect("refused")
            .to_string();
        assert!(err.contains(needle), "expected `{needle}` in: {err}");
    };
    check(
        &|d| std::fs::write(d.join("3/broken.png"), b"not a png at all").unwrap(),
        "broken.png",
    );
    check(
        &|d| {
            let good = std::fs::read(d.join("1/00003.png")).unwrap();
            std::fs::write(d.join("1/cut.png"), &good[..good.len() / 2]).unwrap();
        },
        "cut.png",
    );
    check(
        &|d| std::fs::write(d.join("2/notes.txt"), b"hello").unwrap(),
        "notes.txt",
    );
    check(&|d| std::fs::create_dir(d.join("empty")).unwrap(), "empty");
    // Hidden files are left alone.
    let dir = tempfile::tempdir().unwrap();
    write_folder(&set, dir.path(), "png");
    std::fs::write(dir.path().join("4/.DS_Store"), b"x").unwrap();
    assert!(load_spec(&spec(dir.path())).is_ok());
    // A folder without class folders.
    let empty = tempfile::tempdir().unwrap();
    let err = load_spec(&spec(empty.path())).err().unwrap().to_string();
    assert!(err.contains("no class folders"), "{err}");
}

#[test]
fn lenet_trains_from_a_png_folder_as_from_the_idx_files() {
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_folder(&idx.train, &dir.path().join("train"), "png");
    write_folder(&idx.test, &dir.path().join("test"), "png");
    let mut folder = load_spec(&spec(dir.path())).unwrap();
    // Image folders train with random resized crops and flips by default (photographs);
    // digits are not photographs, and the comparison needs the same training as the IDX set.
    assert_eq!(folder.augment, Augment::images());
    let asked = slim_core::data::DataOptions {
        augment: Some(Augment::none()),
        ..Default::default()
    };
    let plain = slim_core::data::load_spec_with(&spec(dir.path()), &asked).unwrap();
    assert_eq!(plain.augment, Augment::none());
    assert_eq!(
        idx.augment,
        Augment::none(),
        "MNIST-like sets are not augmented"
    );
    folder.augment = Augment::none();
    // The IDX digits in the folder's order (by class) with the folder's normalization: the
    // same training, to the bit.
    let reorder = |set: &ImageSet| {
        let (images, labels): (Vec<Vec<u8>>, Vec<u8>) = by_class(set).into_iter().unzip();
        ImageSet {
            images: images.concat().into(),
            labels,
            ..set.clone()
        }
    };
    let mut same = idx.clone();
    same.train = reorder(&idx.train);
    same.test = reorder(&idx.test);
    same.normalize = folder.normalize.clone();
    let cfg = TrainConfig::default().with_epochs(3).with_lr(0.003);
    let mut top1 = Vec::new();
    for data in [&idx, &same, &folder] {
        let mut m = zoo::model("lenet", &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).unwrap();
        train(&mut m, data, &cfg, Default::default(), &mut |_| {}).unwrap();
        top1.push(evaluate(&m, &data.test, &data.normalize, 256).unwrap().top1);
    }
    eprintln!(
        "LeNet, 3 epochs: top-1 {:.4} from IDX, {:.4} from IDX in the folder's order, {:.4} from PNG",
        top1[0], top1[1], top1[2]
    );
    assert_eq!(top1[1], top1[2], "the folder trains as its images do");
    // Another order of the same images draws other batches: as far apart as two seeds are.
    assert!((top1[0] - top1[2]).abs() <= 0.01, "{top1:?}");
}

#[test]
fn grey_and_colour_sets_take_each_others_channels() {
    let grey = load_spec(DEFAULT_SPEC).unwrap().test.take(20);
    let rgb = grey.with_channels(3).unwrap();
    assert_eq!(rgb.shape, [3, 28, 28]);
    for i in 0..rgb.len() {
        let (c, g) = (rgb.sample(i).unwrap().0, grey.sample(i).unwrap().0);
        for k in 0..3 {
            assert_eq!(&c[k * 784..(k + 1) * 784], &g[..]);
        }
    }
    // Back to grey: the luma of equal channels is the value itself.
    assert_eq!(rgb.with_channels(1).unwrap().images, grey.images);
    // A pure red pixel has BT.601 luma 0.299 * 255.
    let red = ImageSet {
        shape: [3, 1, 1],
        classes: 1,
        images: vec![255, 0, 0].into(),
        labels: vec![0],
    };
    assert_eq!(red.with_channels(1).unwrap().images, vec![76].into());
    assert!(red.with_channels(2).is_err());
}

/// `unlabeled:DIR`: every image at any depth, no classes; a seeded tenth held out, the same
/// way every time; the pixels are the files'.
#[test]
fn unlabeled_trees_read_every_image_without_labels() {
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let set = idx.train.take(200);
    let dir = tempfile::tempdir().unwrap();
    // Class folders, but also deeper and shallower files: any tree.
    write_folder(&set, &dir.path().join("a").join("b"), "png");
    let img = image::GrayImage::from_raw(28, 28, set.sample(0).unwrap().0.to_vec()).unwrap();
    img.save(dir.path().join("top.png")).unwrap();
    let spec = format!("unlabeled:{}", dir.path().display());
    let d = load_spec(&spec).unwrap();
    assert!(!d.train.is_labeled() && !d.test.is_labeled());
    assert_eq!(d.train.len() + d.test.len(), 201);
    assert_eq!(d.test.len(), 20);
    assert!(d.train.labels.iter().chain(&d.test.labels).all(|&l| l == 0));
    let again = load_spec(&spec).unwrap();
    assert_eq!(again.test.images, d.test.images);
    // Every image read is one of the files' (the set plus the top-level copy).
    let pixels: std::collections::HashSet<Vec<u8>> = (0..set.len())
        .map(|i| set.sample(i).unwrap().0.to_vec())
        .collect();
    for s in [&d.train, &d.test] {
        for i in 0..s.len() {
            assert!(pixels.contains(&s.sample(i).unwrap().0.to_vec()));
        }
    }
    // One image is not enough to train on and compare.
    let one = tempfile::tempdir().unwrap();
    img.save(one.path().join("x.png")).unwrap();
    let e = load_spec(&format!("unlabeled:{}", one.path().display()))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("at least 2"), "{e}");
}

/// `skip_bad_images` leaves out corrupt, truncated and non-image files, naming each, and
/// keeps every good image in order; `val_fraction` sets the share held out per class.
#[test]
fn bad_files_can_be_skipped_and_the_held_out_share_chosen() {
    use slim_core::data::{load_spec_with, DataOptions};
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let set = idx.train.take(200);
    let dir = tempfile::tempdir().unwrap();
    write_folder(&set, dir.path(), "png");
    let clean = load_spec(&spec(dir.path())).unwrap();
    // The first class's first file (sorted) broken, a truncated copy and a text file beside.
    let first = std::fs::read_dir(dir.path().join("0"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .min()
        .unwrap();
    let good = std::fs::read(&first).unwrap();
    std::fs::write(dir.path().join("0/00000-broken.png"), b"not a png").unwrap();
    std::fs::write(dir.path().join("1/cut.png"), &good[..good.len() / 2]).unwrap();
    std::fs::write(dir.path().join("2/notes.txt"), b"hello").unwrap();
    assert!(load_spec(&spec(dir.path())).is_err());
    let skip = DataOptions {
        skip_bad_images: true,
        ..Default::default()
    };
    let d = load_spec_with(&spec(dir.path()), &skip).unwrap();
    let mut names: Vec<String> = d
        .skipped
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["00000-broken.png", "cut.png", "notes.txt"]);
    // The broken files may have been drawn into either split: the good images are the clean
    // folder's, in the same order.
    let all = |d: &slim_core::data::DataSplits| {
        let mut v: Vec<(Vec<u8>, u8)> = [&d.train, &d.test]
            .iter()
            .flat_map(|s| {
                (0..s.len()).map(|i| (s.sample(i).unwrap().0.to_vec(), s.sample(i).unwrap().1))
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(all(&d), all(&clean));
    // A quarter held out of each class.
    let quarter = DataOptions {
        val_fraction: 0.25,
        ..Default::default()
    };
    let q = load_spec_with(
        &spec(dir.path()),
        &DataOptions {
            skip_bad_images: true,
            ..quarter.clone()
        },
    )
    .unwrap();
    let per_class = |s: &ImageSet, c: u8| s.labels.iter().filter(|&&l| l == c).count();
    for c in 0..10u8 {
        let n = per_class(&q.train, c) + per_class(&q.test, c);
        let want = ((n as f64 * 0.25).round() as usize).max(1);
        assert!(per_class(&q.test, c).abs_diff(want) <= 1, "class {c}");
    }
    assert!(q.test.len() > 40 && q.test.len() < 60, "{}", q.test.len());
    let e = load_spec_with(
        &spec(dir.path()),
        &DataOptions {
            val_fraction: 1.5,
            ..Default::default()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("1.5"), "{e}");
}

/// Real photographs from scikit-image's wheel (`tests/fixtures/photos/`: `rocket.jpg`, a
/// SpaceX launch photo released into the public domain; `chelsea.png` and `camera.png`, CC0 by
/// their photographers, Stefan van der Walt and Lav Varshney) decode as Pillow decodes them:
/// the same size and channels, and the same 8 x 8 block means (`pillow-reference.json`,
/// written with Pillow 13.0 from the same files) within a grey level, exactly for the PNGs.
#[test]
fn photographs_decode_as_pillow_decodes_them() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/photos");
    let text = std::fs::read_to_string(dir.join("pillow-reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    for (file, want) in reference.as_object().unwrap() {
        // A folder of the photo twice: one copy is held out for testing, one trains.
        let tmp = tempfile::tempdir().unwrap();
        let ext = file.rsplit('.').next().unwrap();
        for copy in ["a", "b"] {
            std::fs::copy(dir.join(file), tmp.path().join(format!("{copy}.{ext}"))).unwrap();
        }
        let d = load_spec(&format!("unlabeled:{}", tmp.path().display())).unwrap();
        let [c, h, w] = d.train.shape;
        let dim = |k: &str| want[k].as_u64().unwrap() as usize;
        assert_eq!(
            (c, h, w),
            (dim("channels"), dim("height"), dim("width")),
            "{file}"
        );
        let (px, _) = d.train.sample(0).unwrap();
        let blocks: Vec<f64> = want["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let tolerance = if ext == "png" { 0.001 } else { 1.0 };
        let mut worst = 0f64;
        for ch in 0..c {
            for by in 0..8 {
                for bx in 0..8 {
                    let (mut sum, mut n) = (0f64, 0usize);
                    for y in by * h / 8..(by + 1) * h / 8 {
                        for x in bx * w / 8..(bx + 1) * w / 8 {
                            sum += f64::from(px[ch * h * w + y * w + x]);
                            n += 1;
                        }
                    }
                    let diff = (sum / n as f64 - blocks[ch * 64 + by * 8 + bx]).abs();
                    worst = worst.max(diff);
                }
            }
        }
        eprintln!("{file}: {c}x{h}x{w}, largest block difference from Pillow {worst:.4}");
        assert!(worst <= tolerance, "{file}: {worst}");
    }
}

/// A folder over the decoded cache is read from its files: the same pixels, batches and
/// training as decoded into memory; a requested shape is fitted straight from the files; and
/// a file that stops decoding after it was listed is named by the loader.
#[test]
fn folders_over_the_cache_are_read_from_their_files_batch_by_batch() {
    use slim_core::data::{load_spec_with, DataOptions, Loader, LoaderConfig};
    use std::sync::Arc;
    let idx = load_spec(DEFAULT_SPEC).unwrap();
    let dir = tempfile::tempdir().unwrap();
    write_folder(&idx.train.take(300), &dir.path().join("train"), "png");
    write_folder(&idx.test.take(100), &dir.path().join("val"), "png");
    let opts = |cache_mb: usize, shape: Option<[usize; 3]>| DataOptions {
        cache_mb,
        shape,
        ..Default::default()
    };
    let memory = load_spec_with(&spec(dir.path()), &opts(64, None)).unwrap();
    let files = load_spec_with(&spec(dir.path()), &opts(0, None)).unwrap();
    assert!(!memory.train.is_streamed() && !memory.test.is_streamed());
    assert!(files.train.is_streamed() && files.test.is_streamed());
    assert_eq!(files.normalize, memory.normalize);
    assert_eq!(files.train.labels, memory.train.labels);
    for (a, b) in [(&memory.train, &files.train), (&memory.test, &files.test)] {
        for i in 0..a.len() {
            assert_eq!(a.sample(i).unwrap().0, b.sample(i).unwrap().0, "sample {i}");
        }
    }
    assert_eq!(files.train.fingerprint(), files.train.fingerprint());
    assert_eq!(files.train.take(10).len(), 10);
    // Shuffled, augmented batches: the same to the bit.
    let cfg = LoaderConfig {
        batch_size: 32,
        shuffle: Some(7),
        augment: Augment::images(),
        normalize: memory.normalize.clone(),
        drop_last: true,
    };
    let batches = |set: &ImageSet| -> Vec<Vec<f32>> {
        Loader::new(Arc::new(set.clone()), &cfg, 1, &Device::Cpu)
            .unwrap()
            .map(|b| b.unwrap().images.flatten_all().unwrap().to_vec1().unwrap())
            .collect()
    };
    let (a, b) = (batches(&memory.train), batches(&files.train));
    assert_eq!(a.len(), 9);
    assert!(a == b, "streamed batches differ from the decoded ones");
    // Training on either is the same training.
    let mut top1 = Vec::new();
    for data in [&memory, &files] {
        let mut m = zoo::model("lenet", &ZooConfig::new([1, 28, 28]), 0, &Device::Cpu).unwrap();
        let cfg = TrainConfig::default().with_epochs(1).with_lr(0.003);
        train(&mut m, data, &cfg, Default::default(), &mut |_| {}).unwrap();
        top1.push(evaluate(&m, &data.test, &data.normalize, 64).unwrap().top1);
    }
    assert_eq!(top1[0], top1[1]);
    // A shape asked for at load is fitted straight from the files, in memory or not, and a
    // streamed set resized later fits them the same way.
    let small = load_spec_with(&spec(dir.path()), &opts(64, Some([1, 14, 14]))).unwrap();
    assert_eq!(small.train.shape, [1, 14, 14]);
    assert!(!small.train.is_streamed());
    let later = files.train.resized(14, 14);
    assert_eq!(later.shape, [1, 14, 14]);
    for i in (0..small.train.len()).step_by(37) {
        assert_eq!(small.train.sample(i).unwrap().0, later.sample(i).unwrap().0);
    }
    let rgb = files.test.with_channels(3).unwrap();
    assert_eq!(rgb.sample(0).unwrap().0.len(), 3 * 28 * 28);
    // A file broken after the folder was listed: the loader names it.
    let victim = dir.path().join("val/0");
    let first = std::fs::read_dir(&victim)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    std::fs::write(&first, b"no longer an image").unwrap();
    let err = Loader::new(Arc::new(files.test.clone()), &cfg, 0, &Device::Cpu)
        .unwrap()
        .find_map(|b| b.err())
        .expect("the broken file is reported")
        .to_string();
    let name = first.file_name().unwrap().to_string_lossy().into_owned();
    assert!(err.contains(&name), "expected {name} in: {err}");
    // Listing checks headers: a file that is not an image is refused, or skipped.
    let err = load_spec_with(&spec(dir.path()), &opts(0, None))
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains(&name), "expected {name} in: {err}");
    let skipping = DataOptions {
        skip_bad_images: true,
        ..opts(0, None)
    };
    let d = load_spec_with(&spec(dir.path()), &skipping).unwrap();
    assert_eq!(d.skipped.len(), 1);
    assert_eq!(d.test.len(), 99);
}
