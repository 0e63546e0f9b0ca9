#!/usr/bin/env bash
# pre-commit entry point: pre-commit passes file names; `adapterkit check` wants adapter
# directories (for adapter_config.json) or safetensors files. Each adapter directory is checked
# once, with any extra arguments given in the hook's `args`, written as --flag=value (e.g.
# --allow=AK012,AK041 or --base=path/to/base).
set -euo pipefail
args=() paths=()
for a in "$@"; do
  case "$a" in
    -*) args+=("$a") ;;
    */adapter_config.json|adapter_config.json) paths+=("$(dirname "$a")") ;;
    */adapter_model.safetensors|adapter_model.safetensors) paths+=("$(dirname "$a")") ;;
    *) paths+=("$a") ;;
  esac
done
[ ${#paths[@]} -eq 0 ] && exit 0
mapfile -t unique < <(printf '%s\n' "${paths[@]}" | sort -u)
exec adapterkit check "${unique[@]}" "${args[@]}"
