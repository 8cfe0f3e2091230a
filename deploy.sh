#!/usr/bin/env bash
# Roll out a tagged ml-framework image with docker compose, and roll back if it is unhealthy.
#
#   REGISTRY=registry.example.com ./deploy.sh v1.2.0
#
# Steps (docs/deployment.md): pull REGISTRY/ml-framework:TAG; keep the running image as
# :previous; stop the API, workers and Flower (workers finish their shard: --grace in the
# compose file); tag the new image :current; start; poll the API's /health until it
# answers 200 (RETRIES x DELAY s). If it never does, tag :previous back as :current,
# start that, and exit 1.
#
# Environment: REGISTRY (required), COMPOSE_FILE (docker-compose.prod.yml), ENV_FILE
# (.env.prod), HEALTH_URL (http://127.0.0.1:8000/health), RETRIES (10), DELAY (6).
set -euo pipefail

tag=${1:?usage: deploy.sh TAG   (e.g. v1.2.0)}
registry=${REGISTRY:?set REGISTRY, e.g. registry.example.com/team}
image="$registry/ml-framework"
compose=(docker compose -f "${COMPOSE_FILE:-docker-compose.prod.yml}" --env-file "${ENV_FILE:-.env.prod}")
health_url=${HEALTH_URL:-http://127.0.0.1:8000/health}
retries=${RETRIES:-10}
delay=${DELAY:-6}
export MLF_IMAGE="$image" MLF_TAG=current

log() { printf '%s deploy: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

healthy() {
  local i
  for ((i = 1; i <= retries; i++)); do
    if curl -fsS --max-time 5 "$health_url" >/dev/null 2>&1; then
      log "healthy after $i check(s)"
      return 0
    fi
    log "health check $i/$retries failed; next in ${delay}s"
    sleep "$delay"
  done
  return 1
}

log "pulling $image:$tag"
docker pull "$image:$tag"
had_previous=0
if docker image inspect "$image:current" >/dev/null 2>&1; then
  docker tag "$image:current" "$image:previous"
  had_previous=1
fi
log "stopping ml-api, worker, flower"
"${compose[@]}" stop ml-api worker flower
docker tag "$image:$tag" "$image:current"
log "starting $image:$tag"
"${compose[@]}" up -d --no-build
if healthy; then
  log "deployed $image:$tag"
  exit 0
fi
if [[ $had_previous -eq 1 ]]; then
  log "$image:$tag is unhealthy: rolling back to the previous image"
  docker tag "$image:previous" "$image:current"
  "${compose[@]}" up -d --no-build --force-recreate ml-api worker flower
  healthy || log "the previous image is unhealthy too"
else
  log "$image:$tag is unhealthy and there is no previous image to roll back to"
fi
exit 1
