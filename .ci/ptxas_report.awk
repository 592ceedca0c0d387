# Registers and spills per kernel from ptxas -v output (nvcc -Xptxas=-v) in a
# build log: one summary line per GPU architecture, one line per kernel for
# `arch`. Exit status 1 when a kernel for `arch` spills.
#   awk -v q="'" -v arch=sm_90 -f .ci/ptxas_report.awk build/build.log
/ptxas info *: Compiling entry function/ { split($0, f, q); fn = f[2]; sm = f[4]; spill = "" }
/bytes stack frame/ { spill = $0; sub(/^[ \t]+/, "", spill) }
/ptxas info *: Used [0-9]+ registers/ {
  used = $0
  sub(/.*: Used/, "Used", used)
  regs = used
  sub(/^Used /, "", regs)
  sub(/ registers.*/, "", regs)
  kernels[sm]++
  total++
  if (regs + 0 > maxregs[sm]) maxregs[sm] = regs + 0
  if (spill ~ /[1-9][0-9]* bytes spill/) spills[sm]++
  if (sm == arch) printf "  %s: %s; %s\n", fn, used, spill
}
END {
  for (s in kernels) printf "ptxas %s: %d kernels, at most %d registers, %d spilling\n", s, kernels[s], maxregs[s], spills[s] + 0
  if (total > 0 && !(arch in kernels)) printf "ptxas: no kernels for %s in this log\n", arch
  exit (spills[arch] + 0 > 0)
}
