#!/usr/bin/env bash
# Creates Label Studio's and surgenet-assist's databases on first start of the compose PostgreSQL.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" <<SQL
CREATE DATABASE labelstudio;
CREATE USER surgenet WITH PASSWORD '${SURGENET_DB_PASSWORD:-surgenet}';
CREATE DATABASE surgenet OWNER surgenet;
SQL
