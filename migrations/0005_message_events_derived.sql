-- 0005: a message's events are no longer stored. `resume` replays a message to its recipient and to its
-- sender from the `messages` row itself (backend/src/storage/queries.rs `events_after`), so `events` keeps
-- only what cannot be derived: receipts, peer deletions, and a sender's copy of a message whose recipient
-- deleted their account since (its row is gone then; the deletion stores the copy). An earlier version
-- stored both events of every message: those of messages that still exist are removed here, so that nothing
-- is replayed twice. A message event and any other event never share an index (one log entry, one op).
-- Portable SQL (SQLite and PostgreSQL). Never edit this file once landed.
DELETE FROM events WHERE EXISTS (SELECT 1 FROM messages m WHERE m.id = events.idx);
