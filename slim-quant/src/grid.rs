//! The int8 grid: rounding to it exactly as the fake quantizer does, shared by the runtime and
//! the GEMM.

/// The largest f32 below 0.5.
pub(crate) const HALF_DOWN: f32 = 0.499_999_97;

/// `a` clipped to `[lo, hi]`, times `inv` (`1 / scale`) and rounded half away from zero.
#[inline(always)]
pub(crate) fn round_to_grid(a: f32, lo: f32, hi: f32, inv: f32) -> i8 {
    // `max` and `min` (not `clamp`) so that NaN becomes a bound and never reaches the
    // conversion.
    #[allow(clippy::manual_clamp)] // clamp would let NaN through
    let q = a.max(lo).min(hi) * inv;
    // Adding the largest float below 1/2 (with the value's sign) and truncating (the
    // conversion to an integer) rounds every float exactly as `f32::round`, and vectorizes.
    #[allow(clippy::manual_clamp)]
    let r = (q + HALF_DOWN.copysign(q)).max(-127.0).min(127.0);
    // SAFETY: `r` is finite and within [-127, 127].
    (unsafe { r.to_int_unchecked::<i32>() }) as i8
}

/// The clipping bounds `±127 scale` and `1 / scale` of a quantizer's grid, as the fake
/// quantizer computes them.
pub(crate) fn bounds(scale: f32) -> [f32; 3] {
    let s = f64::from(scale);
    [(-127.0 * s) as f32, (127.0 * s) as f32, (1.0 / s) as f32]
}
