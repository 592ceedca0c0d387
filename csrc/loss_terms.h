// The five terms of the loss and their order (kf.TERM_NAMES). Data only, so
// any translation unit may include it before choosing an instruction set.
#pragma once

namespace koemorph_fused {

enum Term : int { kMse = 0, kL1 = 1, kPerceptual = 2, kTemporal = 3, kSmoothing = 4 };
constexpr int kNumTerms = 5;

}  // namespace koemorph_fused
