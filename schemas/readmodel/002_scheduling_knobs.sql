-- Scheduling knobs a user can change after submission (kiln experiment set ...).
ALTER TABLE experiments
    ADD COLUMN priority  integer NOT NULL DEFAULT 42,
    ADD COLUMN weight    double precision NOT NULL DEFAULT 1.0,
    ADD COLUMN max_slots integer;
