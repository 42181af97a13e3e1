#!/bin/sh
# Least privilege in Postgres: one login role per Unhidra service that keeps
# data, each owning the schema of its name, where its tables go (Postgres's
# default search_path is "$user", public) and with no rights on another's
# schema or on public. The gateway keeps no data and gets no role.
#
# Run once on an empty database by the postgres image (mounted into
# /docker-entrypoint-initdb.d), or by hand on any Postgres 13+:
#   POSTGRES_USER=postgres POSTGRES_DB=unhidra AUTH_API_DB_PASSWORD=... sh roles.sh
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v auth_api="$AUTH_API_DB_PASSWORD" \
    -v chat_service="$CHAT_SERVICE_DB_PASSWORD" \
    -v history_service="$HISTORY_SERVICE_DB_PASSWORD" \
    -v audit_service="$AUDIT_SERVICE_DB_PASSWORD" <<'SQL'
REVOKE ALL ON SCHEMA public FROM PUBLIC;
REVOKE ALL ON DATABASE :"DBNAME" FROM PUBLIC;
CREATE ROLE auth_api LOGIN PASSWORD :'auth_api';
CREATE ROLE chat_service LOGIN PASSWORD :'chat_service';
CREATE ROLE history_service LOGIN PASSWORD :'history_service';
CREATE ROLE audit_service LOGIN PASSWORD :'audit_service';
GRANT CONNECT ON DATABASE :"DBNAME" TO auth_api, chat_service, history_service, audit_service;
CREATE SCHEMA auth_api AUTHORIZATION auth_api;
CREATE SCHEMA chat_service AUTHORIZATION chat_service;
CREATE SCHEMA history_service AUTHORIZATION history_service;
CREATE SCHEMA audit_service AUTHORIZATION audit_service;
SQL
