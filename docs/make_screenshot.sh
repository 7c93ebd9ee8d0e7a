#!/usr/bin/env bash
# Render an audit HTML report in headless Chromium and save a PNG screenshot (report.png by default).
#
#   docs/make_screenshot.sh REPORT.html [OUT.png] [WIDTH] [HEIGHT]
#
# For example, the evaluation report of the bundled toy world:
#   audit demo --workdir /tmp/demo       # aux data -> features -> heads -> evaluate.json (34 min on a busy 2-core box)
#   audit report /tmp/demo/evaluate.json --out /tmp/demo/report.html
#   docs/make_screenshot.sh /tmp/demo/report.html /tmp/demo/report.png 1100 2760
#
# Needs Chromium: `apt-get install chromium-headless-shell` (or chromium / google-chrome).
set -euo pipefail
report=${1:?usage: make_screenshot.sh REPORT.html [OUT.png] [WIDTH] [HEIGHT]}
out=${2:-report.png}
width=${3:-1100}
height=${4:-2400}
browser=""
for name in chromium-headless-shell chromium chromium-browser google-chrome; do
  if command -v "$name" >/dev/null 2>&1; then browser=$name; break; fi
done
if [ -z "$browser" ]; then
  echo "error: no headless Chromium found; apt-get install chromium-headless-shell" >&2
  exit 1
fi
url="file://$(cd "$(dirname "$report")" && pwd)/$(basename "$report")"
# --no-sandbox: Chromium refuses to run as root with its sandbox; the page is our own local file.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${width},${height}" \
  --screenshot="$out" "$url" 2>/dev/null
echo "screenshot written to $out"
