-- Users and API tokens. Owned by the gateway, not projections of the event log: a replay creates them empty
-- in its rebuild schema and `replay --swap` leaves the live ones where they are (services/tracker/replay.py).
-- A token is stored only as the SHA-256 of its value; a password only as an argon2id hash.
CREATE TABLE users (
    id             bigserial PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    password_hash  text NOT NULL,
    admin          boolean NOT NULL DEFAULT false,
    active         boolean NOT NULL DEFAULT true,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE api_tokens (
    id             bigserial PRIMARY KEY,
    user_id        bigint NOT NULL REFERENCES users (id),
    token_sha256   text NOT NULL UNIQUE,
    name           text NOT NULL,
    kind           text NOT NULL,            -- 'session' (from a login) or 'named' (kiln token create)
    created_at     timestamptz NOT NULL DEFAULT now(),
    expires_at     timestamptz,
    revoked_at     timestamptz
);
CREATE INDEX api_tokens_user ON api_tokens (user_id);
