-- Archived experiments (ExperimentMetadataChanged.archived, Determined's `experiment archive`): hidden from the
-- experiment list unless asked for; nothing else about them changes.
ALTER TABLE experiments ADD COLUMN archived boolean NOT NULL DEFAULT false;
