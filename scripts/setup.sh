#!/usr/bin/env bash
# Sets up a fresh Debian machine for xlb and runs the demo.
#
#   sudo ./scripts/setup.sh            install what is missing, build, run `cargo xtask demo`
#   sudo ./scripts/setup.sh --no-demo  install and build only (CI)
#
# Installs: Debian packages (LLVM matching the nightly's, test tools, BIRD for the fleet tests,
# etcd for the etcd tests), the
# nightly `rust-src` component, bpf-linker built against that LLVM, and
# cargo-fuzz (the tests fuzz the packet parser).
# Every step checks first, so running it again is quick.
set -euo pipefail

demo=1
for arg in "$@"; do
  case "$arg" in
    --no-demo) demo=0 ;;
    -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.."
say() { printf '\n==> %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup: run as root (it installs packages; xlb needs BPF and network namespaces)" >&2
  exit 1
fi
export PATH="$HOME/.cargo/bin:$PATH"
command -v cargo >/dev/null && command -v rustup >/dev/null || {
  echo "setup: needs rustup and cargo (https://rustup.rs)" >&2; exit 1; }

# The eBPF side builds with nightly; bpf-linker must use the same LLVM major
# version as that nightly's rustc.
say "Rust nightly with rust-src"
if ! rustup run nightly rustc -V >/dev/null 2>&1; then
  rustup toolchain install nightly --profile minimal
fi
rustup component add rust-src --toolchain nightly
llvm=$(rustup run nightly rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$llvm" ] || { echo "setup: cannot read nightly's LLVM version" >&2; exit 1; }
echo "nightly uses LLVM $llvm"

say "Debian packages"
packages=(
  "llvm-$llvm-dev" "libpolly-$llvm-dev" libzstd-dev zlib1g-dev pkg-config g++
  iproute2 ethtool iputils-ping procps util-linux tcpdump netsniff-ng iperf3 curl prometheus bird2
  systemd  # systemd-analyze, for the unit file's test (systemd need not run)
  chromium chromium-driver  # the status page's test drives a headless browser
  etcd-server etcd-client protobuf-compiler libprotobuf-dev  # etcd discovery: its tests run a real etcd; the client crate needs protoc and its well-known types
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -q
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
else
  echo "all present"
fi

say "bpf-linker (LLVM $llvm)"
# grep without -q reads all of ldd's output: with -q it may exit first,
# and under pipefail ldd's SIGPIPE would fail the check (and rebuild).
if command -v bpf-linker >/dev/null && ldd "$(command -v bpf-linker)" | grep "libLLVM.so.$llvm" >/dev/null; then
  bpf-linker --version
else
  LLVM_PREFIX="/usr/lib/llvm-$llvm" PATH="/usr/lib/llvm-$llvm/bin:$PATH" \
    cargo install bpf-linker --version 0.13.0 --locked --force --no-default-features --features "llvm-$llvm"
fi

say "cargo-fuzz"
if cargo fuzz --version 2>/dev/null | grep -q "^cargo-fuzz 0.13.2$"; then
  cargo fuzz --version
else
  cargo install cargo-fuzz --version 0.13.2 --locked --force
fi

say "Build"
cargo build --release --locked -p lb-user

if [ "$demo" = 1 ]; then
  say "Demo"
  cargo xtask demo
fi
