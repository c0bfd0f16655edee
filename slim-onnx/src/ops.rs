//! The ONNX ops the importer takes, and how: the table behind `docs/onnx.md` (a test keeps the
//! page equal to it) and behind [`SUPPORTED_OPS`].

/// `(ONNX op, what Slim makes of it and its limits)`, in the order of the docs' table.
pub const OP_TABLE: [(&str, &str); 76] = [
    ("Conv", "2-D convolution (grouped, depthwise, dilated), and 1-D as 2-D of height one; one dilation for both axes; unequal strides as the convolution at the smaller one (or 1) and a stepped slice of rows or columns; padding on one side beyond the others becomes a Pad node; a 1x1 convolution on a pooled vector becomes a linear layer"),
    ("ConvTranspose", "1-D and 2-D transposed convolution (groups, output_padding, output_shape, auto_pad); a stride and padding per axis and side; one dilation for both axes"),
    ("BatchNormalization", "batch norm over [C, H, W] maps or [C] vectors; constant scale and shift after it are folded in"),
    ("Gemm", "linear layer (alpha, beta, transB); transA refused but in a graph of one sample, where Gemm is a dense layer over the rows and a matrix C an added constant"),
    ("MatMul", "by a constant matrix: a linear layer (vectors) or a dense layer over the last axis (tokens); by a constant vector: a dense layer of one output; by constant batched matrices, or of two data values: a batched product"),
    ("Relu", "ReLU"),
    ("Clip", "ReLU, ReLU6 or a clamp; min/max as attributes (opset < 11) or constant inputs"),
    ("LeakyRelu", "leaky ReLU"),
    ("PRelu", "per-channel or single learned slope; a slope that broadcasts otherwise (per position) as relu(x) + slope · (x - relu(x))"),
    ("HardSwish", "hardswish; also recognized from x·relu6(x+3)/6 and x·hardsigmoid(x)"),
    ("HardSigmoid", "hard sigmoid; also recognized from relu6(x+3)/6"),
    ("Sigmoid", "sigmoid; x·sigmoid(x) becomes SiLU"),
    ("Tanh", "tanh"),
    ("Erf", "error function; x·(1+erf(x/√2))/2 becomes GELU"),
    ("Gelu", "exact GELU, or its tanh approximation (approximate=\"tanh\")"),
    ("Elu", "any alpha"),
    ("Selu", "any alpha and gamma"),
    ("Softplus", "log(1 + exp(x)), computed without overflow"),
    ("Softsign", "x / (1 + |x|)"),
    ("Mish", "x·tanh(softplus(x)); written out before opset 18 on export"),
    ("Abs", "element-wise"),
    ("Round", "halves to even"),
    ("Exp", "element-wise"),
    ("Log", "element-wise"),
    ("Max", "of one value or more, data or constants, broadcast"),
    ("Min", "as Max"),
    ("Add", "sum of data (broadcast); data plus a constant folded into the layer before, else a per-channel affine or a constant tensor"),
    ("Sub", "as Add; constant minus data too"),
    ("Mul", "element-wise or squeeze-and-excite gate; by a constant as Add"),
    ("Div", "data by a constant (folded as a scale), constant by data, data by data"),
    ("Neg", "a scale of -1"),
    ("Pow", "by a constant (x² exact for negative x) or by data"),
    ("Sqrt", "square root"),
    ("Reciprocal", "1/x"),
    ("Sum", "n-ary sum of data of one shape"),
    ("Concat", "channels, or any axis but the batch; constant inputs (one value for every sample) as constant nodes"),
    ("Split", "into slices along any axis but the batch"),
    ("Slice", "data along any axis but the batch (positive steps); constants too"),
    ("MaxPool", "1-D, 2-D and 3-D (as 2-D pools of reshaped planes); any window, strides, dilations and padding (explicit or auto_pad), ceil_mode; no indices output"),
    ("AveragePool", "as MaxPool, count_include_pad either way"),
    ("GlobalAveragePool", "mean over the plane (over the length of a 1-D sequence)"),
    ("GlobalMaxPool", "largest value of the plane (of a 1-D sequence)"),
    ("ReduceMean", "any axes but the batch (over the plane: global average pooling)"),
    ("ReduceMax", "any axes but the batch"),
    ("ReduceSum", "any axes but the batch"),
    ("ReduceMin", "any axes but the batch"),
    ("ReduceL1", "any axes but the batch"),
    ("ReduceL2", "any axes but the batch"),
    ("ReduceSumSquare", "any axes but the batch"),
    ("ArgMax", "along any axis but the batch, first or last occurrence; the index as a float"),
    ("ArgMin", "as ArgMax"),
    ("LRN", "local response normalization across channels"),
    ("LayerNormalization", "over the axes from `axis` on, with scale and bias; its mean and inverse deviation outputs computed beside it when used"),
    ("InstanceNormalization", "a layer norm over each channel's values and a per-channel affine"),
    ("GroupNormalization", "a layer norm over each group's values and an affine per channel (opset 21) or per group (opset 18)"),
    ("DepthToSpace", "DCR and CRD modes, as reshapes around a transpose"),
    ("SpaceToDepth", "DCR and CRD modes, as reshapes around a transpose"),
    ("Softmax", "any axis but the batch (before opset 13: the channels of a pooled value, or the last axis)"),
    ("Pad", "height and width; constant, edge or reflect; zeros before a convolution join its padding"),
    ("Resize", "height and width, nearest (every nearest_mode), linear or cubic (any cubic_coeff_a, exclude_outside), half_pixel, half_pixel_symmetric, pytorch_half_pixel, align_corners, asymmetric or tf_crop_and_resize coordinates (a region of the plane, points outside filled); antialiased linear and cubic shrinking; scales, or sizes with any keep_aspect_ratio_policy"),
    ("Upsample", "as Resize with asymmetric coordinates (opsets 7 to 9)"),
    ("Flatten", "from axis 1"),
    ("Reshape", "any per-sample shape (0 and -1 resolved); channel shuffles recognized"),
    ("Transpose", "any permutation of the per-sample axes; Reshape-Transpose-Reshape channel shuffles become one op"),
    ("Squeeze", "axes of one"),
    ("Unsqueeze", "new axes after the batch axis"),
    ("QuantizeLinear", "on data: with only DequantizeLinear after it, one scale and 8 bits, a fake quantizer (a ReLU too when the zero point is the type's lowest value) that the int8 runtime runs; otherwise its integers (8, 16 or 32 bits) or 8-bit floats, one scale, one per slice of an axis, or one per block (block_size), computed element-wise; on constants, folded"),
    ("DequantizeLinear", "of int8 constants: folded, and a convolution or linear layer whose weight it is holds it as int8 (zero points 0, one scale per tensor or output channel), so the model runs on the int8 runtime; of a fake quantizer: the pair's second half; of other data: (x - zero) · scale, with the scales of QuantizeLinear"),
    ("Identity", "passed through"),
    ("Dropout", "kept for training, nothing at inference; its mask output, where used, keeps every value (training_mode with a ratio above 0 is refused)"),
    ("Cast", "to float types on data, and to the 8-bit floats (opset 19: E4M3FN, E4M3FNUZ, E5M2, E5M2FNUZ, rounded to them with `saturate`); constants to any numeric type"),
    ("Constant", "folded"),
    ("ConstantOfShape", "folded (the weights of the model zoo's light networks)"),
    ("Shape", "folded, with Gather, Slice, Concat, Unsqueeze and arithmetic on it"),
    ("Expand", "a constant over the batch (a transformer's class token, its shape read from the input's): a constant node; data broadcast to a larger per-sample shape: a product with ones of that shape"),
    ("Gather", "on constants (shape arithmetic), and on data with constant indices along a per-sample axis (a class token: slices, concatenated)"),
];

const fn names<const N: usize>(table: [(&'static str, &'static str); N]) -> [&'static str; N] {
    let mut out = [""; N];
    let mut i = 0;
    while i < N {
        out[i] = table[i].0;
        i += 1;
    }
    out
}

/// The ops the importer understands (domain `ai.onnx`, opsets 7 to 21).
pub const SUPPORTED_OPS: &[&str] = &names(OP_TABLE);

/// The page `docs/onnx.md`: the supported ops and what Slim makes of each.
pub fn markdown() -> String {
    let mut s = String::from(
        "# ONNX import\n\n\
         `slim import MODEL.onnx --out MODEL.safetensors` (or any command given an `.onnx` file) reads\n\
         models of opsets 7 to 21, tensors in external data files beside the model included. Every\n\
         unsupported op of a model is listed in one error. Symbolic input sizes come from\n\
         `--input-shape CxHxW`. Values keep their batch axis apart: an op that would mix samples is\n\
         refused, naming the node. A graph written for one sample, without a batch axis (ops over\n\
         every axis of a vector or a table), imports with `--single-sample`: its input's whole\n\
         shape is a sample, and the model applies the graph to each sample of a batch (every op\n\
         but those that read the first axis as the batch: convolutions, pooling, batch norm and\n\
         LRN). Constant subgraphs of any rank are folded (arithmetic with broadcasting,\n\
         Concat, Gather, Slice with any steps, Expand, Transpose, unary functions).\n\n\
         Pruning follows channels through convolutions, batch norms, activations, pooling, LRN,\n\
         padding, resizing, per-channel arithmetic, concatenation, squeeze-and-excite gates, and\n\
         ops along the plane (slices of rows or columns, reductions and softmaxes over the plane,\n\
         instance norm); ops across the channels (attention, reshapes, group norm, channel\n\
         slices) block the groups they touch, and `slim info` names them. Every op runs in the int8 runtime: convolutions and linear layers in integers,\n\
         the rest in floats between them.\n\n\
         This page is generated from the importer's table (`slim-onnx/src/ops.rs`); a test fails\n\
         when the two differ (`SLIM_BLESS=1 cargo test -p slim-onnx --test docs` rewrites it).\n\n\
         | ONNX op | in Slim |\n|---|---|\n",
    );
    for (op, what) in OP_TABLE {
        s.push_str(&format!("| {op} | {what} |\n"));
    }
    s
}
