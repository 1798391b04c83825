package shadow

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/pgmeta"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/sync"
)

// ErrSoak means finalize was asked for before the soak period had passed.
var ErrSoak = errors.New("the soak period since the cutover has not passed")

// CutoverOptions are the operator's bounds on a cutover or rollback.
type CutoverOptions struct {
	LockTimeout         time.Duration
	Deadline            time.Duration
	CancelBlockersAfter time.Duration
	OnAttempt           func(cutover.Attempt)
	// BeforeCommit is a test failpoint just before the swap's COMMIT.
	BeforeCommit func(ctx context.Context, tx pgx.Tx) error
	// AfterCommit is a test failpoint right after a cutover's swap has
	// committed, before anything else: in logical sync the follower still
	// reads the stream and the slot is still there.
	AfterCommit func(ctx context.Context)
	// MaxCutoverStall bounds, in logical mode, how long writes to blue wait
	// while the stream drains; past it the attempt is released and retried.
	MaxCutoverStall time.Duration
}

// DefaultMaxCutoverStall is the logical drain budget of a cutover attempt.
const DefaultMaxCutoverStall = 2 * time.Second

// asyncSwapOptions are swapOptions for a swap that commits without waiting
// for the WAL flush; finishSwap's record of it, committed synchronously,
// makes it durable before anyone is told (cutover.SwapOptions.AsyncCommit).
func (o CutoverOptions) asyncSwapOptions(r *Runner, id string) cutover.SwapOptions {
	so := o.swapOptions(r, id)
	so.AsyncCommit = true
	return so
}

func (o CutoverOptions) swapOptions(r *Runner, id string) cutover.SwapOptions {
	d := o.Deadline
	if d <= 0 {
		d = 5 * time.Minute
	}
	lt := o.LockTimeout
	if lt <= 0 {
		lt = DefaultLockTimeout
	}
	return cutover.SwapOptions{
		LockTimeout: lt, Deadline: time.Now().Add(d), CancelBlockersAfter: o.CancelBlockersAfter,
		BeforeCommit: o.BeforeCommit, Log: r.Log.With().Str("migration", id).Logger(),
		Retryable: func(err error) bool { return errors.Is(err, ErrSyncStalled) },
		OnAttempt: func(a cutover.Attempt) {
			var bs []string
			for _, b := range a.Blockers {
				bs = append(bs, b.String())
			}
			_ = r.Store.Event(context.Background(), r.Pool, id, "swap_attempt",
				fmt.Sprintf("attempt %d: lock not granted within %s; blockers: %s", a.No, lt, strings.Join(bs, "; ")), a)
			if o.OnAttempt != nil {
				o.OnAttempt(a)
			}
		},
	}
}

// servedBy reads what public.<table> is now: "blue" (the table), "green" (a
// view over green), or "" (nothing by that name).
func (r *Runner) servedBy(ctx context.Context, m *Migration) (string, error) {
	var kind *string
	err := r.Pool.QueryRow(ctx, `SELECT c.relkind::text FROM pg_class c WHERE c.oid = to_regclass($1)`, m.Table.Quoted()).Scan(&kind)
	if errors.Is(err, pgx.ErrNoRows) || (err == nil && kind == nil) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	if *kind == "v" {
		return "green", nil
	}
	return "blue", nil
}

// reconcile settles a migration whose last swap was interrupted (the process
// died, or the connection failed during COMMIT): what the database serves is
// the truth, and the swap's transaction also wrote the catalog, so both agree;
// only the intermediate phase needs undoing.
func (r *Runner) reconcile(ctx context.Context, m *Migration) (*Migration, error) {
	if m.Phase != CuttingOver && m.Phase != RollingBack {
		return m, nil
	}
	served, err := r.servedBy(ctx, m)
	if err != nil {
		return nil, err
	}
	to := Ready
	switch {
	case m.Phase == CuttingOver && served == "blue" && m.State.LastCutover != nil && m.State.LastCutover.Kind == "rollback":
		to = RolledBack
	case m.Phase == RollingBack && served == "green":
		to = CutOver
	case m.Phase == RollingBack && served == "blue":
		to = RolledBack
	case served == "green":
		to = CutOver
	}
	r.Log.Warn().Str("migration", m.ID).Str("phase", string(m.Phase)).Str("served_by", served).Msg("an earlier swap was interrupted; settling the phase from what the database serves")
	if err := r.Store.SetPhase(ctx, r.Pool, m.ID, []Phase{m.Phase}, to, ""); err != nil {
		return nil, err
	}
	return r.Store.Get(ctx, r.Pool, m.ID)
}

// claimSettled claims the migration (waiting briefly for another driver to
// let go) and settles an interrupted swap before anything else happens.
func (r *Runner) claimSettled(ctx context.Context, id string) (*claimHandle, *Migration, error) {
	claim, err := r.claim(ctx, id, 30*time.Second)
	if err != nil {
		return nil, nil, err
	}
	m, err := r.Store.Get(ctx, r.Pool, id)
	if err == nil {
		m, err = r.reconcile(ctx, m)
	}
	if err != nil {
		claim.release()
		return nil, nil, err
	}
	return claim, m, nil
}

// Cutover swaps public.<table> to a view over green in one short transaction
// (see cutover.Swap for the lock discipline) and replaces the forward sync by
// the reverse one, so blue stays current for a rollback.
func (r *Runner) Cutover(ctx context.Context, id string, opts CutoverOptions) (*Migration, error) {
	claim, m, err := r.claimSettled(ctx, id)
	if err != nil {
		return nil, err
	}
	defer claim.release()
	if m.Phase == CutOver {
		return m, fmt.Errorf("migration %s is already cut over: %w", id, ErrWrongPhase)
	}
	if m.Phase != Ready && m.Phase != RolledBack {
		return m, fmt.Errorf("migration %s is %s; a cutover needs ready or rolled_back: %w", id, m.Phase, ErrWrongPhase)
	}
	prev := m.Phase
	logical := m.logical()
	stopFollower := func() {}
	if logical {
		stopFollower = r.ensureFollower(ctx, m)
		defer func() { stopFollower() }()
	}
	if err := r.Store.SetPhase(ctx, r.Pool, id, []Phase{prev}, CuttingOver, ""); err != nil {
		return m, err
	}
	p := m.State.Plan
	parked := pgsql.QualifiedName{Schema: m.Table.Schema, Name: p.Names.ParkedBlue}
	green := p.Forward.Target
	relations := []pgsql.QualifiedName{m.Table, green}
	for _, fk := range p.Blue.InboundFKs {
		relations = append(relations, pgsql.QualifiedName{Schema: fk.Schema, Name: fk.Table})
	}
	lockFirst, lockAfterDrain := relations, []pgsql.QualifiedName(nil)
	if logical {
		// Blue first; green only after the stream has drained into it.
		lockFirst, lockAfterDrain = relations[:1], relations[1:]
	}
	var drainRounds int
	var caughtUpUnderLock time.Duration
	stall := opts.MaxCutoverStall
	if stall <= 0 {
		stall = DefaultMaxCutoverStall
	}
	fwd, rev := r.forwardSync(m), r.reverseSync(m)
	// What can be done before the lock is: the application waits for
	// every millisecond after it.
	var greenFKs []string
	var published bool // blue is in the migration's publication
	var marker *pgxpool.Conn
	err = func() error {
		if err := r.withShortLock(ctx, m, "create the reverse sync's functions", func(tx pgx.Tx) error {
			return sync.Exec(ctx, tx, rev.FunctionsSQL())
		}); err != nil {
			return err
		}
		if !logical {
			return nil
		}
		// Green's foreign keys that a previous cutover has not added
		// (only this migration, whose claim we hold, adds them).
		if greenFKs, err = addGreenFKsSQL(ctx, r.Pool, green, p.DeferredConstraints); err != nil {
			return err
		}
		if err := r.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication_rel pr JOIN pg_publication p ON p.oid = pr.prpubid
			WHERE p.pubname = $1 AND pr.prrelid = to_regclass($2))`, m.State.Publication, m.Table.Quoted()).Scan(&published); err != nil {
			return fmt.Errorf("read publication %s: %w", m.State.Publication, err)
		}
		// Drain the backlog before taking any lock, so that under the
		// lock only the last moments' changes are left to apply.
		if drainRounds, err = r.drainForSwap(ctx, m); err != nil {
			return err
		}
		marker, err = r.Pool.Acquire(ctx)
		return err
	}()
	if marker != nil {
		defer marker.Release()
	}
	if err != nil {
		_ = r.Store.SetPhase(context.WithoutCancel(ctx), r.Pool, id, []Phase{CuttingOver}, prev, "")
		return m, fmt.Errorf("cutover of %s: %w", id, err)
	}
	swapOpts := opts.asyncSwapOptions(r, id)
	if logical {
		// Green is locked fully only after the drain under blue's lock. An
		// autovacuum of green (likely after the apply's burst of writes)
		// would keep that lock waiting, and the application with it; kept
		// off green from the start, it cannot. (At 8,000,000 rows under
		// load one hold was 118.6 ms, of which the drain took 17.2 ms.)
		swapOpts.Guarded = []pgsql.QualifiedName{green}
	}
	res, err := cutover.Swap(ctx, r.Pool, lockFirst, func(ctx context.Context, tx pgx.Tx) error {
		var stmts []string // one round trip: the application waits on the lock
		if logical {
			// Blue takes no writes now: mark the WAL and let green apply
			// everything before the mark, within the stall budget.
			start := time.Now()
			if err := r.catchUp(ctx, marker, m, stall, stall, true); err != nil {
				return err
			}
			caughtUpUnderLock = time.Since(start)
			for _, rel := range lockAfterDrain {
				stmts = append(stmts, "LOCK TABLE "+rel.Quoted()+" IN ACCESS EXCLUSIVE MODE")
			}
			// Blue's changes from now on come from the reverse sync: stop
			// publishing them, or a follower still reading would apply
			// them back into green. Taking blue out of the publication
			// rather than dropping it: a WAL sender decoding past a
			// dropped publication fails ("publication does not exist",
			// an ERROR in the server's log at every cutover) and its
			// follower reconnects and decodes again, with the
			// application just let go; the publication goes with the
			// slot after the commit.
			if published {
				stmts = append(stmts, fmt.Sprintf("ALTER PUBLICATION %s DROP TABLE %s", pgsql.Ident(m.State.Publication), m.Table.Quoted()))
			}
			// Green equals blue now: its foreign keys, held back while the
			// stream replayed the past (see buildDeferred), check every
			// write from here on; the rows are validated after the commit.
			stmts = append(stmts, greenFKs...)
		}
		stmts = append(stmts, fwd.DropTriggersSQL()...)
		stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s RENAME TO %s", m.Table.Quoted(), pgsql.Ident(parked.Name)))
		stmts = append(stmts, viewSQL(m.Table, p.Green, p.Blue)...)
		stmts = append(stmts, greenAccessSQL(p.Blue, p.Green)...)
		stmts = append(stmts, userTriggersToGreen(p.Blue, parked, green)...)
		stmts = append(stmts, rev.TriggersSQL()...)
		for _, fk := range p.Blue.InboundFKs {
			stmts = append(stmts, repointFK(fk, green)...)
		}
		return r.swapAndRecord(ctx, tx, m, stmts, CuttingOver, CutOver, "green")
	}, swapOpts)
	if err == nil && opts.AfterCommit != nil {
		opts.AfterCommit(ctx)
	}
	m2, err := r.finishSwap(ctx, m, "cutover", prev, CutOver, "green", res, err, p.Blue.InboundFKs, swapDrain{drainRounds, caughtUpUnderLock})
	if logical && err == nil {
		stopFollower()
		stopFollower = func() {}
		if rerr := r.removeLogical(context.WithoutCancel(ctx), m, ""); rerr != nil {
			r.Log.Error().Err(rerr).Msg("could not drop the replication slot after the cutover; drop it by hand")
		}
	}
	// Green's foreign keys check every write already (NOT VALID since the
	// build, or since the swap itself in logical sync); finalize validates
	// their rows, before green becomes the table. Not here: the validation
	// joins all of green with each referenced table, and it kept the
	// cutover command running for 7.5 s after a 14 ms swap at 8,000,000
	// rows, loading the server right as green took its first traffic. The
	// rows need no proof the verification has not given: green holds
	// exactly blue's rows, which blue's own keys checked.
	return m2, err
}

// swapAndRecord runs a swap's statements and writes its new phase and
// serving side, in the swap transaction (so the catalog and what the
// database serves always agree) and in one round trip with them.
func (r *Runner) swapAndRecord(ctx context.Context, tx pgx.Tx, m *Migration, stmts []string, from, to Phase, serving string) error {
	st := m.State
	st.Serving = serving
	if to == CutOver {
		st.LogicalDone = true // every later sync is by triggers
	}
	record, err := r.Store.PhaseAndStateStatement(m.ID, []Phase{from}, to, st)
	if err != nil {
		return err
	}
	moved, err := pgsql.ExecPipelinedThen(ctx, tx, stmts, record)
	if err != nil {
		return err
	}
	if moved == 0 {
		return r.Store.WrongPhase(ctx, tx, m.ID, []Phase{from})
	}
	return nil
}

// swapDrain is what a logical cutover did to catch green up (see drainForSwap).
type swapDrain struct {
	rounds    int
	underLock time.Duration
}

// finishSwap records a swap's outcome: on success its measurements (the phase
// was written by the swap itself); on failure, what the database serves
// decides: unchanged, the phase goes back to prev; changed (a commit whose
// answer was lost), the swap stands.
func (r *Runner) finishSwap(ctx context.Context, m *Migration, kind string, prev, to Phase, serving string, res cutover.SwapResult, swapErr error, fks []pgmeta.Constraint, drain swapDrain) (*Migration, error) {
	ctx = context.WithoutCancel(ctx)
	if swapErr != nil {
		if errors.Is(swapErr, cutover.ErrAmbiguousCommit) {
			r.Log.Warn().Str("migration", m.ID).Err(swapErr).Msg("the swap's commit had no answer; reading what the database serves")
		}
		served, err := r.servedBy(ctx, m)
		if err != nil {
			return m, fmt.Errorf("%s of %s: %w; and what the database serves could not be read: %v", kind, m.ID, swapErr, err)
		}
		if served != serving { // not swapped: back to where it was
			if err := r.Store.SetPhase(ctx, r.Pool, m.ID, []Phase{CuttingOver, RollingBack}, prev, ""); err != nil {
				return m, err
			}
			m2, _ := r.Store.Get(ctx, r.Pool, m.ID)
			return m2, fmt.Errorf("%s of %s did not happen (%s still serves): %w", kind, m.ID, served, swapErr)
		}
		r.Log.Warn().Str("migration", m.ID).Msg("the swap had committed after all")
	}
	m.State.Serving = serving
	if to == CutOver {
		m.State.LogicalDone = true
	}
	m.State.LastCutover = &SwapRecord{Kind: kind, At: time.Now().UTC(), Attempts: res.Attempts,
		LockWaitMS: float64(res.LockWait.Microseconds()) / 1000, LockHoldMS: float64(res.LockHold.Microseconds()) / 1000,
		DrainRounds: drain.rounds, CatchUpUnderLockMS: float64(drain.underLock.Microseconds()) / 1000,
		CommitMS: float64(res.Commit.Microseconds()) / 1000, AfterCommitLSN: res.AfterCommitLSN}
	// Committed synchronously whatever the session's default: its flush
	// makes the swap's asynchronous commit durable too (the WAL before it).
	err := pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SET LOCAL synchronous_commit = on"); err != nil {
			return err
		}
		if err := r.Store.SaveState(ctx, tx, m.ID, m.State); err != nil {
			return err
		}
		return r.Store.Event(ctx, tx, m.ID, kind, fmt.Sprintf("%s: %s serves; %s", kind, serving, m.State.LastCutover.Summary()), m.State.LastCutover)
	})
	if err != nil {
		return m, err
	}
	r.Log.Info().Str("migration", m.ID).Str("serving", serving).Int("attempts", res.Attempts).
		Float64("lock_wait_ms", m.State.LastCutover.LockWaitMS).Float64("lock_hold_ms", m.State.LastCutover.LockHoldMS).
		Int("drain_rounds", drain.rounds).Float64("catch_up_under_lock_ms", m.State.LastCutover.CatchUpUnderLockMS).Msg(kind + " done")
	// Re-pointed foreign keys were added NOT VALID under the lock; validate
	// them now, outside it (writes go on meanwhile).
	for _, fk := range fks {
		child := pgsql.QualifiedName{Schema: fk.Schema, Name: fk.Table}
		if _, err := r.Pool.Exec(ctx, fmt.Sprintf("ALTER TABLE %s VALIDATE CONSTRAINT %s", child.Quoted(), pgsql.Ident(fk.Name))); err != nil {
			r.Log.Error().Err(err).Str("constraint", fk.Name).Msg("validating a re-pointed foreign key failed; it stays NOT VALID")
		}
	}
	return r.Store.Get(ctx, r.Pool, m.ID)
}

// Rollback serves blue again: the view goes, blue gets its name back and the
// forward sync returns. Blue missed nothing: the reverse sync kept it current.
// Before a cutover it is the same as abort.
func (r *Runner) Rollback(ctx context.Context, id string, opts CutoverOptions) (*Migration, error) {
	m, err := r.Store.Get(ctx, r.Pool, id)
	if err != nil {
		return nil, err
	}
	if m.Phase == RolledBack && m.State.Serving != "green" {
		// Already done (a retried rollback whose answer was lost, say): a
		// repeat must neither swap again nor tear the migration down.
		return m, fmt.Errorf("migration %s is already rolled back (blue serves); cut over again or abort: %w", id, ErrWrongPhase)
	}
	if m.State.Serving != "green" && m.Phase != CuttingOver && m.Phase != RollingBack && m.Phase != CutOver {
		if err := r.Abort(ctx, id, "rolled back before the cutover (same as abort)"); err != nil {
			return m, err
		}
		return r.Store.Get(ctx, r.Pool, id)
	}
	claim, m, err := r.claimSettled(ctx, id)
	if err != nil {
		return nil, err
	}
	defer claim.release()
	if m.Phase != CutOver {
		return m, fmt.Errorf("migration %s is %s; a rollback needs cut_over: %w", id, m.Phase, ErrWrongPhase)
	}
	if err := r.Store.SetPhase(ctx, r.Pool, id, []Phase{CutOver}, RollingBack, ""); err != nil {
		return m, err
	}
	p := m.State.Plan
	parked := pgsql.QualifiedName{Schema: m.Table.Schema, Name: p.Names.ParkedBlue}
	green := p.Forward.Target
	relations := []pgsql.QualifiedName{m.Table, green, parked}
	for _, fk := range p.Blue.InboundFKs {
		relations = append(relations, pgsql.QualifiedName{Schema: fk.Schema, Name: fk.Table})
	}
	fwd, rev := r.forwardSync(m), r.reverseSync(m)
	// Created before the lock, which the application waits on.
	if err := r.withShortLock(ctx, m, "create the forward sync's functions", func(tx pgx.Tx) error {
		return sync.Exec(ctx, tx, fwd.FunctionsSQL())
	}); err != nil {
		_ = r.Store.SetPhase(context.WithoutCancel(ctx), r.Pool, id, []Phase{RollingBack}, CutOver, "")
		return m, fmt.Errorf("rollback of %s: %w", id, err)
	}
	res, err := cutover.Swap(ctx, r.Pool, relations, func(ctx context.Context, tx pgx.Tx) error {
		stmts := rev.DropTriggersSQL()
		stmts = append(stmts, "DROP VIEW "+m.Table.Quoted())
		stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s RENAME TO %s", parked.Quoted(), pgsql.Ident(m.Table.Name)))
		stmts = append(stmts, userTriggersToBlue(p.Blue, m.Table, green)...)
		stmts = append(stmts, fwd.TriggersSQL()...)
		for _, fk := range p.Blue.InboundFKs {
			stmts = append(stmts, repointFK(fk, m.Table)...)
		}
		return r.swapAndRecord(ctx, tx, m, stmts, RollingBack, RolledBack, "blue")
	}, opts.asyncSwapOptions(r, id))
	return r.finishSwap(ctx, m, "rollback", CutOver, RolledBack, "blue", res, err, p.Blue.InboundFKs, swapDrain{})
}

// Finalize makes green the table itself under the original name, hands blue's
// sequences to it, and drops blue and every sync object, in one short locked
// transaction.
func (r *Runner) Finalize(ctx context.Context, id string, minSoak time.Duration, force bool, opts CutoverOptions) (*Migration, error) {
	claim, m, err := r.claimSettled(ctx, id)
	if err != nil {
		return nil, err
	}
	defer claim.release()
	if m.Phase == Finalized {
		return m, nil
	}
	if m.Phase != CutOver && m.Phase != Finalizing {
		return m, fmt.Errorf("migration %s is %s; finalize needs cut_over: %w", id, m.Phase, ErrWrongPhase)
	}
	if !force && m.CutOverAt != nil && time.Since(*m.CutOverAt) < minSoak {
		return m, fmt.Errorf("migration %s: %w: cut over %s ago, --min-soak is %s (wait, or use --force)", id, ErrSoak,
			time.Since(*m.CutOverAt).Round(time.Second), minSoak)
	}
	if m.Phase != Finalizing {
		if err := r.Store.SetPhase(ctx, r.Pool, id, []Phase{CutOver}, Finalizing, ""); err != nil {
			return m, err
		}
	}
	p := m.State.Plan
	parked := pgsql.QualifiedName{Schema: m.Table.Schema, Name: p.Names.ParkedBlue}
	green := p.Forward.Target
	final := m.Table
	fwd, rev := r.forwardSync(m), r.reverseSync(m)
	// Green becomes the table: its foreign keys must be valid (one added at
	// a logical cutover may not have been validated yet).
	var greenThere bool
	if err := r.Pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, green.Quoted()).Scan(&greenThere); err != nil {
		return m, err
	}
	if greenThere {
		if err := r.validateGreenFKs(ctx, m, green); err != nil {
			return m, fmt.Errorf("finalize %s: %w", id, err)
		}
	}
	var already bool
	res, err := cutover.Swap(ctx, r.Pool, []pgsql.QualifiedName{m.Table}, func(ctx context.Context, tx pgx.Tx) error {
		// A finalize that committed but died before the catalog said so.
		if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NULL`, green.Quoted()).Scan(&already); err != nil || already {
			return err
		}
		if _, err := tx.Exec(ctx, "LOCK TABLE "+parked.Quoted()+" IN ACCESS EXCLUSIVE MODE"); err != nil {
			return err
		}
		stmts := rev.DropTriggersSQL()
		stmts = append(stmts, "DROP VIEW "+m.Table.Quoted())
		var identities []identityHandover
		for _, s := range p.Blue.Sequences {
			seq := pgsql.QualifiedName{Schema: s.Schema, Name: s.Name}
			if s.Identity {
				h := identityHandover{seq: s}
				var c pgmeta.Column
				c, _ = p.Blue.Column(s.Column)
				h.always = c.Identity == "a"
				// Its options and grants, then its value: the sequence is
				// dropped with blue and made anew by ADD GENERATED below.
				// Bounds at their defaults for the old type are left to
				// default for the column's type (as ALTER COLUMN TYPE does
				// for identity).
				var start, typMin, typMax int64
				if err := tx.QueryRow(ctx, `SELECT s.seqstart, s.seqincrement, s.seqmin, s.seqmax, s.seqcache, s.seqcycle,
					CASE s.seqtypid WHEN 'int2'::regtype THEN -32768 WHEN 'int4'::regtype THEN -2147483648 ELSE -9223372036854775808 END,
					CASE s.seqtypid WHEN 'int2'::regtype THEN 32767 WHEN 'int4'::regtype THEN 2147483647 ELSE 9223372036854775807 END
					FROM pg_sequence s WHERE s.seqrelid = $1::regclass`, seq.Quoted()).
					Scan(&start, &h.increment, &h.min, &h.max, &h.cache, &h.cycle, &typMin, &typMax); err != nil {
					return fmt.Errorf("read identity sequence %s: %w", seq, err)
				}
				// Keep nextval off the sequence until this commits: a value
				// handed out after the read below would be handed out again
				// by the new identity. nextval takes ROW EXCLUSIVE on the
				// sequence, which ALTER SEQUENCE's lock conflicts with (LOCK
				// TABLE refuses sequences); the statement sets the cache to
				// what it is. A caller blocked here fails once the sequence
				// is dropped: an error, where it would have been a duplicate.
				if _, err := tx.Exec(ctx, fmt.Sprintf("ALTER SEQUENCE %s CACHE %d", seq.Quoted(), h.cache)); err != nil {
					return fmt.Errorf("lock identity sequence %s: %w", seq, err)
				}
				var last *int64 // nil: never called
				if err := tx.QueryRow(ctx, `SELECT pg_sequence_last_value($1::regclass)`, seq.Quoted()).Scan(&last); err != nil {
					return fmt.Errorf("read identity sequence %s: %w", seq, err)
				}
				h.last = start - h.increment
				if last != nil {
					h.last = *last
				}
				if fp := r.Failpoints.FinalizeIdentityRead; fp != nil {
					if err := fp(ctx, seq); err != nil {
						return err
					}
				}
				rows, err := tx.Query(ctx, `SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE pg_get_userbyid(a.grantee) END, a.privilege_type, a.is_grantable
					FROM pg_class c, aclexplode(c.relacl) a WHERE c.oid = $1::regclass AND a.grantee <> c.relowner ORDER BY 1, 2`, seq.Quoted())
				if err != nil {
					return fmt.Errorf("read the grants on %s: %w", seq, err)
				}
				if h.grants, err = pgx.CollectRows(rows, func(r pgx.CollectableRow) (pgmeta.Grant, error) {
					var g pgmeta.Grant
					return g, r.Scan(&g.Grantee, &g.Privilege, &g.Grantable)
				}); err != nil {
					return fmt.Errorf("read the grants on %s: %w", seq, err)
				}
				h.defaultMin, h.defaultMax = h.min == 1, h.max == typMax
				if h.increment < 0 {
					h.defaultMin, h.defaultMax = h.min == typMin, h.max == -1
				}
				identities = append(identities, h)
				stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s DROP DEFAULT", green.Quoted(), pgsql.Ident(s.Column)))
				continue
			}
			stmts = append(stmts, fmt.Sprintf("ALTER SEQUENCE %s OWNED BY NONE", seq.Quoted()))
		}
		stmts = append(stmts, "DROP TABLE "+parked.Quoted())
		stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s SET SCHEMA %s", green.Quoted(), pgsql.Ident(final.Schema)))
		if greenGetsFillfactor(p.Blue) {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s RESET (fillfactor)", final.Quoted()))
		}
		for _, s := range p.Blue.Sequences {
			if !s.Identity {
				stmts = append(stmts, fmt.Sprintf("ALTER SEQUENCE %s OWNED BY %s.%s", pgsql.QualifiedName{Schema: s.Schema, Name: s.Name}.Quoted(), final.Quoted(), pgsql.Ident(s.Column)))
			}
		}
		for _, h := range identities {
			mode := "BY DEFAULT"
			if h.always {
				mode = "ALWAYS"
			}
			seq := pgsql.QualifiedName{Schema: h.seq.Schema, Name: h.seq.Name}.Quoted()
			start := h.last + h.increment
			opts := fmt.Sprintf("SEQUENCE NAME %s INCREMENT BY %d CACHE %d", seq, h.increment, h.cache)
			if !h.defaultMin {
				opts += fmt.Sprintf(" MINVALUE %d", h.min)
			}
			if !h.defaultMax {
				opts += fmt.Sprintf(" MAXVALUE %d", h.max)
			}
			if h.cycle {
				opts += " CYCLE"
				// Past the end it wraps, as nextval would.
				if h.increment > 0 && start > h.max {
					start = h.min
				} else if h.increment < 0 && start < h.min {
					start = h.max
				}
			}
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s ALTER COLUMN %s ADD GENERATED %s AS IDENTITY (%s START WITH %d)",
				final.Quoted(), pgsql.Ident(h.seq.Column), mode, opts, start))
			for _, g := range h.grants {
				grantee := "PUBLIC"
				if g.Grantee != "PUBLIC" {
					grantee = pgsql.Ident(g.Grantee)
				}
				grant := fmt.Sprintf("GRANT %s ON SEQUENCE %s TO %s", g.Privilege, seq, grantee)
				if g.Grantable {
					grant += " WITH GRANT OPTION"
				}
				stmts = append(stmts, grant)
			}
		}
		if p.Blue.Comment != "" {
			stmts = append(stmts, fmt.Sprintf("COMMENT ON TABLE %s IS %s", final.Quoted(), pgsql.Literal(p.Blue.Comment)))
		}
		switch p.Blue.ReplicaIdentity {
		case "f":
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY FULL", final.Quoted()))
		case "n":
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY NOTHING", final.Quoted()))
		case "i":
			stmts = append(stmts, fmt.Sprintf("DO $$BEGIN IF to_regclass(%s) IS NOT NULL THEN EXECUTE %s; END IF; END$$",
				pgsql.Literal(pgsql.QualifiedName{Schema: final.Schema, Name: p.Blue.ReplicaIndex}.Quoted()),
				pgsql.Literal(fmt.Sprintf("ALTER TABLE %s REPLICA IDENTITY USING INDEX %s", final.Quoted(), pgsql.Ident(p.Blue.ReplicaIndex)))))
		}
		stmts = append(stmts, fwd.DropFunctionsSQL()...)
		stmts = append(stmts, rev.DropFunctionsSQL()...)
		if err := sync.Exec(ctx, tx, stmts); err != nil {
			return err
		}
		// The original owner, where this role may give it away.
		if _, err := tx.Exec(ctx, "SAVEPOINT owner"); err != nil {
			return err
		}
		if _, err := tx.Exec(ctx, fmt.Sprintf("ALTER TABLE %s OWNER TO %s", final.Quoted(), pgsql.Ident(p.Blue.Owner))); err != nil {
			r.Log.Warn().Err(err).Str("owner", p.Blue.Owner).Msg("could not give the table back to its owner")
			if _, err := tx.Exec(ctx, "ROLLBACK TO SAVEPOINT owner"); err != nil {
				return err
			}
		}
		return nil
	}, opts.swapOptions(r, id))
	ctx = context.WithoutCancel(ctx)
	if err != nil {
		// A COMMIT without an answer: what the database holds decides.
		var done bool
		var readErr error
		if errors.Is(err, cutover.ErrAmbiguousCommit) {
			readErr = r.Pool.QueryRow(ctx, `SELECT to_regclass($1) IS NULL AND (SELECT relkind = 'r' FROM pg_class WHERE oid = to_regclass($2))`,
				green.Quoted(), final.Quoted()).Scan(&done)
		}
		if !done {
			if readErr != nil { // unknown: stay finalizing, the next finalize finds out
				return m, fmt.Errorf("finalize %s: %w; and whether it took effect could not be read: %v (run finalize again)", id, err, readErr)
			}
			// It did not happen: cut over as before, so that the operator
			// may roll back as well as finalize again.
			if serr := r.Store.SetPhase(ctx, r.Pool, id, []Phase{Finalizing}, CutOver, ""); serr != nil {
				return m, fmt.Errorf("finalize %s: %w; and the phase could not be set back to cut_over: %v", id, err, serr)
			}
			m2, _ := r.Store.Get(ctx, r.Pool, id)
			if m2 != nil {
				m = m2
			}
			return m, fmt.Errorf("finalize %s: %w (the migration stays cut over; run finalize again)", id, err)
		}
		r.Log.Warn().Str("migration", id).Err(err).Msg("the finalize's commit had no answer, but it took effect")
	}
	if err := r.dropGreenSchemaIfEmpty(ctx, m); err != nil {
		r.Log.Warn().Err(err).Msg("could not drop the green schema")
	}
	err = pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
		if err := r.Store.Event(ctx, tx, id, "finalize", fmt.Sprintf("finalized: %s is green's table; blue dropped; lock hold %.1f ms",
			final, float64(res.LockHold.Microseconds())/1000), res); err != nil {
			return err
		}
		return r.Store.SetPhase(ctx, tx, id, []Phase{Finalizing}, Finalized, "")
	})
	if err != nil {
		return m, err
	}
	return r.Store.Get(ctx, r.Pool, id)
}

type identityHandover struct {
	seq                    pgmeta.Sequence
	always                 bool
	last, increment        int64
	min, max, cache        int64
	cycle                  bool
	defaultMin, defaultMax bool
	grants                 []pgmeta.Grant
}

// viewSQL creates public.<table> as a view over green: green's columns in
// green's order, invoker's rights (RLS and privileges apply to the caller),
// green's defaults on the view (for an explicit DEFAULT through the view),
// blue's grants and comment.
func viewSQL(name pgsql.QualifiedName, green, blue *pgmeta.Table) []string {
	cols := make([]string, len(green.Columns))
	for i, c := range green.Columns {
		cols[i] = pgsql.Ident(c.Name)
	}
	// An invoker's-rights view makes PostgreSQL check the caller's rights on
	// every column of green the view reads, which a role with column-level
	// grants only does not have. Without RLS to apply, an owner's-rights view
	// is equivalent (the caller's rights are checked on the view, which has
	// blue's grants, columns included); with RLS the invoker's view is needed
	// and column-only grantees cannot read through it (a PostgreSQL limit).
	with := " WITH (security_invoker = true)"
	if !blue.RLS && slices.ContainsFunc(blue.Grants, func(g pgmeta.Grant) bool { return g.Column != "" }) {
		with = ""
	}
	stmts := []string{fmt.Sprintf("CREATE VIEW %s%s AS SELECT %s FROM %s",
		name.Quoted(), with, strings.Join(cols, ", "), green.QName().Quoted())}
	for _, c := range green.Columns {
		if c.Default != "" && !c.Generated {
			stmts = append(stmts, fmt.Sprintf("ALTER VIEW %s ALTER COLUMN %s SET DEFAULT %s", name.Quoted(), pgsql.Ident(c.Name), c.Default))
		}
	}
	stmts = append(stmts, grantSQL(blue.Grants, name, green)...)
	if blue.Comment != "" {
		stmts = append(stmts, fmt.Sprintf("COMMENT ON VIEW %s IS %s", name.Quoted(), pgsql.Literal(blue.Comment)))
	}
	return stmts
}

// grantSQL re-applies grants on a relation with cols' columns; a column
// privilege on a column it does not have (dropped by the ALTER) is left out.
func grantSQL(grants []pgmeta.Grant, on pgsql.QualifiedName, cols *pgmeta.Table) []string {
	var stmts []string
	for _, g := range grants {
		grantee := "PUBLIC"
		if g.Grantee != "PUBLIC" {
			grantee = pgsql.Ident(g.Grantee)
		}
		priv := g.Privilege
		if g.Column != "" {
			if _, ok := cols.Column(g.Column); !ok {
				continue
			}
			priv += " (" + pgsql.Ident(g.Column) + ")"
		}
		s := fmt.Sprintf("GRANT %s ON %s TO %s", priv, on.Quoted(), grantee)
		if g.Grantable {
			s += " WITH GRANT OPTION"
		}
		stmts = append(stmts, s)
	}
	return stmts
}

// greenAccessSQL gives green what the invoker-rights view needs: blue's
// grants (and USAGE on green's schema) and blue's row-level security.
func greenAccessSQL(blue, greenT *pgmeta.Table) []string {
	green := greenT.QName()
	stmts := grantSQL(blue.Grants, green, greenT)
	seen := map[string]bool{}
	for _, g := range blue.Grants {
		if !seen[g.Grantee] {
			seen[g.Grantee] = true
			grantee := "PUBLIC"
			if g.Grantee != "PUBLIC" {
				grantee = pgsql.Ident(g.Grantee)
			}
			stmts = append(stmts, fmt.Sprintf("GRANT USAGE ON SCHEMA %s TO %s", pgsql.Ident(green.Schema), grantee))
		}
	}
	if blue.RLS {
		for _, pol := range blue.Policies {
			name := strings.Fields(pol)[2]
			stmts = append(stmts, fmt.Sprintf("DROP POLICY IF EXISTS %s ON %s", name, green.Quoted()))
			stmts = append(stmts, strings.Replace(pol, "{{TABLE}}", green.Quoted(), 1))
		}
		stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s ENABLE ROW LEVEL SECURITY", green.Quoted()))
		if blue.ForceRLS {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s FORCE ROW LEVEL SECURITY", green.Quoted()))
		}
	}
	return stmts
}

// userTriggersToGreen re-creates blue's own triggers on green and disables
// them on blue, so each fires once: on the side the application writes.
func userTriggersToGreen(blue *pgmeta.Table, parked, green pgsql.QualifiedName) []string {
	var stmts []string
	for _, t := range blue.Triggers {
		def := strings.Replace(t.Def, " ON "+blue.SQLName+" ", " ON "+green.Quoted()+" ", 1)
		stmts = append(stmts, fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.Name), green.Quoted()), def)
		if t.Enabled == "D" {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s DISABLE TRIGGER %s", green.Quoted(), pgsql.Ident(t.Name)))
		} else {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s DISABLE TRIGGER %s", parked.Quoted(), pgsql.Ident(t.Name)))
		}
	}
	return stmts
}

// userTriggersToBlue undoes userTriggersToGreen.
func userTriggersToBlue(blue *pgmeta.Table, name, green pgsql.QualifiedName) []string {
	var stmts []string
	for _, t := range blue.Triggers {
		stmts = append(stmts, fmt.Sprintf("DROP TRIGGER IF EXISTS %s ON %s", pgsql.Ident(t.Name), green.Quoted()))
		mode := map[string]string{"O": "ENABLE", "R": "ENABLE REPLICA", "A": "ENABLE ALWAYS"}[t.Enabled]
		if mode != "" {
			stmts = append(stmts, fmt.Sprintf("ALTER TABLE %s %s TRIGGER %s", name.Quoted(), mode, pgsql.Ident(t.Name)))
		}
	}
	return stmts
}

// repointFK makes a referencing table's foreign key point at to, NOT VALID
// (validated after the swap, outside the lock).
func repointFK(fk pgmeta.Constraint, to pgsql.QualifiedName) []string {
	child := pgsql.QualifiedName{Schema: fk.Schema, Name: fk.Table}
	return []string{
		fmt.Sprintf("ALTER TABLE %s DROP CONSTRAINT %s", child.Quoted(), pgsql.Ident(fk.Name)),
		fmt.Sprintf("ALTER TABLE %s ADD CONSTRAINT %s %s NOT VALID", child.Quoted(), pgsql.Ident(fk.Name), fk.ForeignKeyDef(to.Quoted())),
	}
}
