# Registers and spills of the CUDA kernels, from ptxas -v output (nvcc
# -Xptxas=-v) in a build log: one summary line, plus one line per kernel that
# spills registers (then exit status 1). Nothing when the log has no ptxas output.
#   awk -v q="'" -f .ci/ptxas_report.awk build/build.log
# Kernel names are demangled with c++filt where it is installed.
/ptxas info *: Compiling entry function/ { split($0, f, q); fn = f[2]; sm = f[4]; spill = "" }
/bytes stack frame/ { spill = $0; sub(/^[ \t]+/, "", spill) }
/ptxas info *: Used [0-9]+ registers/ {
  regs = $0
  sub(/.*: Used /, "", regs)
  sub(/ registers.*/, "", regs)
  if (!(sm in kernels)) archs = archs (archs == "" ? "" : " ") sm
  kernels[sm]++
  total++
  if (regs + 0 > maxregs) maxregs = regs + 0
  if (spill ~ /[1-9][0-9]* bytes spill/) {
    name = fn
    if ((("c++filt " q fn q) | getline demangled) > 0) name = demangled
    close("c++filt " q fn q)
    spilling[++nspill] = sprintf("ptxas: %s spills on %s: %s", name, sm, spill)
  }
}
END {
  if (total == 0) exit 0
  printf "ptxas: %d kernels for %s, at most %d registers, %s (details in the build log)\n", \
    total, archs, maxregs, nspill ? nspill " spilling" : "no spills"
  for (i = 1; i <= nspill; i++) print spilling[i]
  exit (nspill > 0)
}
