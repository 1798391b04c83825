package shadow

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/internal/retry"
	"github.com/shadowctl/shadowctl/sync"
)

// Preflight refusals of the logical sync, each named with its fix.
var (
	ErrLogicalUnavailable = errors.New("logical sync is not possible here")
	ErrSyncStalled        = errors.New("the logical sync did not catch up in time")
)

// logical reports whether green is kept current by the logical sync now: from
// preparing until the first cutover (every later sync uses triggers).
func (m *Migration) logical() bool { return m.Sync == SyncLogical && !m.State.LogicalDone }

// LogicalActive reports whether the migration's green is kept current by the
// logical sync now (so some process must apply the stream).
func (m *Migration) LogicalActive() bool { return m.logical() }

func slotNameFor(p *Plan) string { return "shadowctl_" + p.Names.Base }

// preflightLogical names each missing precondition with its fix.
func (r *Runner) preflightLogical(ctx context.Context, blue *pgmeta.Table) error {
	var walLevel string
	var freeSlots, replident int
	var canReplicate, owner bool
	err := r.Pool.QueryRow(ctx, `SELECT current_setting('wal_level'),
		current_setting('max_replication_slots')::int - (SELECT count(*) FROM pg_replication_slots),
		(SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)::bool,
		pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = $1), 'USAGE'),
		(SELECT CASE relreplident WHEN 'd' THEN 0 WHEN 'i' THEN 1 WHEN 'f' THEN 2 ELSE 3 END FROM pg_class WHERE oid = $1)`, blue.OID).
		Scan(&walLevel, &freeSlots, &canReplicate, &owner, &replident)
	if err != nil {
		return fmt.Errorf("logical sync preflight: %w", err)
	}
	var problems []string
	if walLevel != "logical" {
		problems = append(problems, fmt.Sprintf("wal_level is %s: set wal_level = logical and restart PostgreSQL", walLevel))
	}
	if freeSlots < 1 {
		problems = append(problems, "no free replication slot: raise max_replication_slots (restart) or drop an unused slot")
	}
	if !canReplicate {
		problems = append(problems, "the role lacks REPLICATION: ALTER ROLE <role> REPLICATION")
	}
	if !owner {
		problems = append(problems, fmt.Sprintf("the role does not own %s (CREATE PUBLICATION needs it)", blue.QName()))
	}
	isPK := false
	for _, ix := range blue.Indexes {
		if ix.Primary && ix.Name == blue.KeyIndex {
			isPK = true
		}
	}
	if replident == 3 || (replident == 0 && !isPK) {
		problems = append(problems, fmt.Sprintf("%s's replica identity does not carry its key %v: ALTER TABLE %s REPLICA IDENTITY USING INDEX %s",
			blue.QName(), blue.Key, blue.QName(), pgsql.Ident(blue.KeyIndex)))
	}
	if len(problems) > 0 {
		return fmt.Errorf("%w: %v", ErrLogicalUnavailable, problems)
	}
	return nil
}

// prepareLogical creates the publication and the slot, records the starting
// position and the copy's ranges, and moves to copying. Repeatable: a
// half-done attempt's slot is dropped and made again (nothing was copied
// yet).
func (r *Runner) prepareLogical(ctx context.Context, m *Migration) error {
	p := m.State.Plan
	name := slotNameFor(p)
	if err := r.removeLogical(ctx, m, name); err != nil {
		return err
	}
	err := r.withShortLock(ctx, m, "create the publication for "+m.Table.String(), func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, fmt.Sprintf("CREATE PUBLICATION %s FOR TABLE %s", pgsql.Ident(name), m.Table.Quoted()))
		return err
	})
	if err != nil {
		return err
	}
	slot, err := sync.CreateSlot(ctx, sync.ReplicationConfig(r.ConnConfig), name)
	if err != nil {
		return fmt.Errorf("%w (the migration can be resumed or aborted)", err)
	}
	m.State.Slot, m.State.Publication = name, name
	return pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `INSERT INTO `+r.Store.Cat.T("sync_positions")+` (migration_id, slot_name, applied_lsn)
			VALUES ($1, $2, $3::text::pg_lsn) ON CONFLICT (migration_id) DO UPDATE SET slot_name = EXCLUDED.slot_name, applied_lsn = EXCLUDED.applied_lsn, updated_at = now()`,
			m.ID, name, slot.ConsistentPoint.String()); err != nil {
			return err
		}
		ranges, err := r.copier(m).SplitRanges(ctx, tx, max(m.Request.Workers*4, 1))
		if err != nil {
			return err
		}
		if err := r.Store.InitRanges(ctx, tx, m.ID, ranges); err != nil {
			return err
		}
		if err := r.Store.SaveState(ctx, tx, m.ID, m.State); err != nil {
			return err
		}
		return r.Store.SetPhase(ctx, tx, m.ID, []Phase{Preparing}, Copying, "")
	})
}

// applier builds the logical applier of a migration.
func (r *Runner) applier(m *Migration) *sync.Applier {
	p := m.State.Plan
	cat := r.Store.Cat
	return &sync.Applier{
		ReplConfig: sync.ReplicationConfig(r.ConnConfig), Pool: r.Pool, Slot: m.State.Slot, Publication: m.State.Publication,
		Mapping: p.Forward, SourceColumns: p.Blue.Columns, MaxRetainedWAL: m.Request.MaxRetainedWAL,
		Log:  r.Log.With().Str("migration", m.ID).Logger(),
		Pace: r.pace(m),
		LoadPosition: func(ctx context.Context) (pglogrepl.LSN, error) {
			var s string
			if err := r.Pool.QueryRow(ctx, `SELECT applied_lsn::text FROM `+cat.T("sync_positions")+` WHERE migration_id = $1`, m.ID).Scan(&s); err != nil {
				return 0, fmt.Errorf("read the sync position: %w", err)
			}
			return pglogrepl.ParseLSN(s)
		},
		SavePosition: func(lsn pglogrepl.LSN, at time.Time) (string, []any) {
			return `UPDATE ` + cat.T("sync_positions") + ` SET applied_lsn = greatest(applied_lsn, $2::text::pg_lsn), applied_at = $3, updated_at = now() WHERE migration_id = $1`,
				[]any{m.ID, lsn.String(), at}
		},
	}
}

// Follow applies the logical stream until ctx ends or the migration leaves
// the phases that need it. Transient errors restart the stream with backoff;
// a TRUNCATE, DDL on blue or the WAL limit fail the migration (and drop the
// slot, so no WAL stays pinned).
func (r *Runner) Follow(ctx context.Context, id string) error {
	for attempt := 0; ; attempt++ {
		m, err := r.Store.Get(ctx, r.Pool, id)
		if err != nil {
			return err
		}
		if !m.logical() || (m.Phase != Verifying && m.Phase != Ready && m.Phase != CuttingOver && m.Phase != Copying) {
			return nil
		}
		if m.Phase == Copying {
			return fmt.Errorf("migration %s is still copying: the stream is applied after the copy", id)
		}
		if m.Phase == Verifying && !m.State.IndexesBuilt {
			// Green's indexes, its key included (deferKey), are built
			// after the copy: the apply finds rows by the key, and plans
			// its grouping once from green's unique indexes.
			built, err := r.greenIndexesBuilt(ctx, m)
			if err != nil {
				return err
			}
			if !built {
				return fmt.Errorf("migration %s is building green's indexes: the stream is applied after them", id)
			}
		}
		runCtx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { // stop when the migration moves on (cutover, abort)
			defer close(done)
			t := time.NewTicker(500 * time.Millisecond)
			defer t.Stop()
			for {
				select {
				case <-runCtx.Done():
					return
				case <-t.C:
					cur, err := r.Store.Get(runCtx, r.Pool, id)
					if err == nil && (!cur.logical() || cur.Phase.Terminal() || cur.Phase == Failed || cur.Phase == Aborting) {
						cancel()
						return
					}
				}
			}
		}()
		err = r.applier(m).Run(runCtx)
		cancel()
		<-done
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, sync.ErrTruncate) || errors.Is(err, sync.ErrRelationChanged) || errors.Is(err, sync.ErrWALLimit) {
			return r.fail(context.WithoutCancel(ctx), m, err, nil)
		}
		cur, gerr := r.Store.Get(ctx, r.Pool, id)
		if gerr == nil && !cur.logical() {
			return nil
		}
		r.Log.Warn().Err(err).Str("migration", id).Int("attempt", attempt+1).Msg("logical sync interrupted; restarting it")
		if err := retry.Backoff(ctx, attempt, 200*time.Millisecond, 10*time.Second); err != nil {
			return err
		}
	}
}

// greenIndexesBuilt says whether every deferred index of green exists and is
// valid.
func (r *Runner) greenIndexesBuilt(ctx context.Context, m *Migration) (bool, error) {
	p := m.State.Plan
	names := make([]string, len(p.DeferredIndexes))
	for i, ix := range p.DeferredIndexes {
		names[i] = pgsql.QualifiedName{Schema: p.Forward.Target.Schema, Name: ix.Name}.Quoted()
	}
	var built int
	if err := r.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_index WHERE indexrelid = ANY (SELECT to_regclass(n) FROM unnest($1::text[]) n) AND indisvalid`, names).Scan(&built); err != nil {
		return false, fmt.Errorf("read green's indexes: %w", err)
	}
	return built == len(names), nil
}

// catchUp marks the current end of the WAL and waits until green has applied
// everything before the mark. It gives up when the applied position stops
// moving for stall: a backlog that is being worked off is waited for however
// long it is (the mark is fixed, so progress always ends the wait) — unless
// total is set, a hard limit for callers that hold the application back
// meanwhile (the swap, under its lock).
//
// The mark is a transactional message committed with synchronous_commit on,
// in its own transaction: its commit flushes the WAL up to it (the WAL sender
// only decodes flushed WAL), and it comes after every transaction that
// committed before it — in particular, once the caller holds a lock that
// keeps writers off blue, after every write to blue.
//
// urgent (the swap's catch-ups) also tells the applier to read the stream
// as it comes for a while, instead of in gulps: the application is, or is
// about to be, held back while it waits.
//
// q writes the mark and reads the position: the pool, or a connection the
// swap took before its lock, so that nothing under the lock waits for the
// pool (an Acquire there took 6 ms on a busy machine).
func (r *Runner) catchUp(ctx context.Context, q catchUpConn, m *Migration, total, stall time.Duration, urgent bool) error {
	content := m.ID
	if urgent {
		content = sync.UrgentMarker + m.ID
	}
	var mark string
	// One round trip, not four: under the swap's lock each cost the
	// application 1–3 ms on a busy machine. (On an error the connection is
	// left in a transaction, and the pool closes it rather than reuse it.)
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue("SET LOCAL synchronous_commit = on")
	b.Queue(`SELECT pg_logical_emit_message(true, $1, $2)::text`, sync.MarkerPrefix, content).QueryRow(func(row pgx.Row) error {
		return row.Scan(&mark)
	})
	b.Queue("COMMIT")
	if err := q.SendBatch(ctx, b).Close(); err != nil {
		return fmt.Errorf("mark the WAL: %w", err)
	}
	start := time.Now()
	movedAt, last := start, ""
	defer func() { r.Log.Debug().Str("migration", m.ID).Dur("took", time.Since(start)).Msg("caught up") }()
	for {
		var done bool
		var applied string
		if err := q.QueryRow(ctx, `SELECT applied_lsn >= $2::text::pg_lsn, applied_lsn::text FROM `+r.Store.Cat.T("sync_positions")+` WHERE migration_id = $1`, m.ID, mark).Scan(&done, &applied); err != nil {
			return fmt.Errorf("read the sync position: %w", err)
		}
		if done {
			return nil
		}
		if applied != last {
			movedAt, last = time.Now(), applied
		}
		if total > 0 && time.Since(start) > total {
			return fmt.Errorf("%w: green had not applied up to %s within %s", ErrSyncStalled, mark, total)
		}
		if time.Since(movedAt) > stall {
			return fmt.Errorf("%w: green's applied position stayed at %s for %s, short of %s (is an applier running? see `shadowctl status`)", ErrSyncStalled, applied, stall, mark)
		}
		// Poll fast at first and while the application waits (a swap under
		// its lock), then gently: a long backlog is not drained faster by
		// asking more often.
		lo, hi := 2*time.Millisecond, 4*time.Millisecond
		switch {
		case total > 0: // under the swap's lock: each poll is one indexed read on a held connection
			lo, hi = time.Millisecond, 2*time.Millisecond
		case time.Since(start) > 200*time.Millisecond:
			lo, hi = 25*time.Millisecond, 50*time.Millisecond
		}
		if err := retry.Backoff(ctx, 0, lo, hi); err != nil {
			return err
		}
	}
}

// catchUpConn is a pool or one of its connections.
type catchUpConn interface {
	pgsql.Querier
	SendBatch(ctx context.Context, b *pgx.Batch) pgx.BatchResults
}

// Rounds of catching up before a swap takes its lock. A catch-up ends at the
// mark it wrote when it began, so one that drained a long backlog (a cutover
// with no applier running: 10 s behind) leaves everything written meanwhile
// to be applied under the lock, with the application waiting: 280–600 ms of
// lock hold where a running applier gives 20–30 ms. Each further round drains
// what the previous one left; a round shorter than drainSettled leaves about
// that much for the lock.
const (
	drainSettled   = 50 * time.Millisecond
	drainMaxRounds = 10
)

// drainForSwap catches green up in rounds until one round is short (or after
// drainMaxRounds, when the application writes faster than a round settles),
// and reports how many rounds it took.
func (r *Runner) drainForSwap(ctx context.Context, m *Migration) (rounds int, err error) {
	for rounds = 1; ; rounds++ {
		start := time.Now()
		if err := r.catchUp(ctx, r.Pool, m, 0, time.Minute, true); err != nil {
			return rounds, err
		}
		if took := time.Since(start); took < drainSettled || rounds == drainMaxRounds {
			r.Log.Debug().Str("migration", m.ID).Int("rounds", rounds).Dur("last_round", took).Msg("drained before the swap")
			return rounds, nil
		}
	}
}

// ensureFollower starts an applier in this process unless another process
// reads the slot; the returned stop ends it.
func (r *Runner) ensureFollower(ctx context.Context, m *Migration) (stop func()) {
	var active bool
	_ = r.Pool.QueryRow(ctx, `SELECT coalesce((SELECT active FROM pg_replication_slots WHERE slot_name = $1), false)`, m.State.Slot).Scan(&active)
	if active {
		return func() {}
	}
	fctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := r.Follow(fctx, m.ID); err != nil && fctx.Err() == nil {
			r.Log.Error().Err(err).Str("migration", m.ID).Msg("logical sync stopped")
		}
	}()
	return func() { cancel(); <-done }
}

// removeLogical drops the slot, the publication and the position. Each step
// tolerates objects already gone.
func (r *Runner) removeLogical(ctx context.Context, m *Migration, name string) error {
	if name == "" {
		name = m.State.Slot
	}
	if name == "" {
		return nil
	}
	if err := sync.DropSlot(ctx, r.Pool, name); err != nil {
		return err
	}
	if _, err := r.Pool.Exec(ctx, "DROP PUBLICATION IF EXISTS "+pgsql.Ident(name)); err != nil {
		return fmt.Errorf("drop publication %s: %w", name, err)
	}
	_, err := r.Pool.Exec(ctx, `DELETE FROM `+r.Store.Cat.T("sync_positions")+` WHERE migration_id = $1`, m.ID)
	return err
}
