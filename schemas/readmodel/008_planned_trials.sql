-- How many trials an experiment's search plans (TrialCreated.planned_trials): its progress is work done over
-- this plan, so it does not drop when a trial is created.
ALTER TABLE experiments ADD COLUMN planned_trials integer NOT NULL DEFAULT 0;
