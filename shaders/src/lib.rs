//! Brushfire's own CubeCL kernels (none yet: Burn's kernels cover issue 2).
