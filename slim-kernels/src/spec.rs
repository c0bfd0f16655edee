//! The geometry of a 2-D convolution, which the kernels take and the graph IR stores.

use serde::{Deserialize, Serialize};

/// A 2-D convolution. `groups == in_channels == out_channels` is a depthwise convolution.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Conv2dSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
    pub groups: usize,
    pub bias: bool,
}

impl Conv2dSpec {
    /// A dense convolution with a square kernel, stride 1, no padding, no bias.
    pub fn new(in_channels: usize, out_channels: usize, kernel: usize) -> Self {
        Conv2dSpec {
            in_channels,
            out_channels,
            kernel: [kernel, kernel],
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: false,
        }
    }
    pub fn with_stride(mut self, stride: usize) -> Self {
        self.stride = stride;
        self
    }
    pub fn with_padding(mut self, padding: usize) -> Self {
        self.padding = padding;
        self
    }
    pub fn with_dilation(mut self, dilation: usize) -> Self {
        self.dilation = dilation;
        self
    }
    pub fn with_groups(mut self, groups: usize) -> Self {
        self.groups = groups;
        self
    }
    pub fn with_bias(mut self, bias: bool) -> Self {
        self.bias = bias;
        self
    }
    /// True for a depthwise convolution (one filter per input channel, more than one channel).
    pub fn is_depthwise(&self) -> bool {
        self.groups > 1 && self.groups == self.in_channels && self.groups == self.out_channels
    }
    /// Output spatial size for an input size, or `None` when the kernel does not fit.
    pub fn out_size(&self, h: usize, w: usize) -> Option<(usize, usize)> {
        let o = |x: usize, k: usize| {
            let span = self.dilation * (k - 1) + 1;
            let padded = x + 2 * self.padding;
            (padded >= span).then(|| (padded - span) / self.stride + 1)
        };
        Some((o(h, self.kernel[0])?, o(w, self.kernel[1])?))
    }
}
