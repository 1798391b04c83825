package backfill

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/rs/zerolog"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// RunUpdate runs (or resumes) the batched UPDATE backfill u on conn, a
// dedicated session (it holds a session advisory lock on the backfill's id
// for the run, and sets its lock_timeout for the run). Rows are visited in key order, from the checkpoint to the
// largest key present when the backfill first started; with OnlyNull the
// bound is dropped and the run goes on to the end of the table as it finds
// it (rows inserted with a NULL behind the cursor are not seen). Each batch
// and its checkpoint commit together, so a run killed at any point resumes
// exactly where the last commit left it.
func RunUpdate(ctx context.Context, conn *pgx.Conn, cat catalog.Catalog, u Update, o UpdateOptions) (UpdateResult, error) {
	o.defaults()
	started := time.Now()
	var res UpdateResult
	u, err := u.canonical()
	if err != nil {
		return res, err
	}
	// Every statement of the run, not only the batches, waits for locks at
	// most the lock timeout (reading the bounds could queue behind a DDL).
	if err := pgsql.SetLockTimeout(ctx, conn, o.LockTimeout); err != nil {
		return res, fmt.Errorf("backfill: set lock_timeout: %w", err)
	}
	defer func() {
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_, _ = conn.Exec(rctx, `RESET lock_timeout`)
	}()
	t, err := resolve(ctx, conn, u)
	if err != nil {
		return res, err
	}
	sp := u.spec(t)
	id := sp.id()
	res.ID, res.Table = id, t.name.String()
	log := o.Log.With().Str("backfill", id).Str("table", t.name.String()).Logger()

	var locked bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock(hashtextextended('shadowctl.backfill:' || $1, 0))`, id).Scan(&locked); err != nil {
		return res, fmt.Errorf("backfill %s: lock: %w", id, err)
	}
	if !locked {
		return res, fmt.Errorf("backfill %s: %w", id, ErrRunning)
	}
	defer func() {
		uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_, _ = conn.Exec(uctx, `SELECT pg_advisory_unlock(hashtextextended('shadowctl.backfill:' || $1, 0))`, id)
	}()

	ck := checkpointTable(cat)
	if o.Restart {
		if _, err := conn.Exec(ctx, `DELETE FROM `+ck+` WHERE id = $1`, id); err != nil {
			return res, fmt.Errorf("backfill %s: restart: %w", id, err)
		}
	}
	var stored spec
	var lastKey []string
	var done bool
	err = conn.QueryRow(ctx, `SELECT spec, last_key, rows_changed, done FROM `+ck+` WHERE id = $1`, id).
		Scan(&stored, &lastKey, &res.RowsChanged, &done)
	switch {
	case errors.Is(err, pgx.ErrNoRows):
		if err := start(ctx, conn, ck, t, &sp, id); err != nil {
			return res, err
		}
		stored = sp
		log.Info().Strs("key", t.key).Str("key_index", t.keyIndex).Strs("upper_key", sp.UpperKey).
			Int64("estimated_rows", sp.Estimate).Msg("backfill starting")
	case err != nil:
		return res, fmt.Errorf("backfill %s: read checkpoint: %w", id, err)
	case done:
		res.AlreadyDone, res.LastKey = true, lastKey
		log.Info().Int64("rows_changed", res.RowsChanged).Msg("backfill already done (use --restart to run it again)")
		return res, nil
	default:
		res.Resumed = true
		log.Info().Strs("last_key", lastKey).Int64("rows_changed", res.RowsChanged).Msg("backfill resuming from its checkpoint")
	}
	if len(stored.Key) != len(t.key) {
		return res, fmt.Errorf("backfill %s: the table's key changed since the checkpoint (%v, now %v); use --restart: %w",
			id, stored.Key, t.key, ErrBadSpec)
	}
	bounded := u.OnlyNull == ""
	if bounded && len(stored.UpperKey) == 0 { // empty table at start
		return finish(ctx, conn, ck, id, res, started, log)
	}
	st := build(t, u, bounded)
	p := newProgress(stored, lastKey, o.ProgressEvery)

	size := min(1000, o.MaxBatch)
	if o.MaxRowsPerSecond > 0 {
		size = min(size, max(1, int(o.MaxRowsPerSecond)))
	}
	for {
		if err := ctx.Err(); err != nil {
			return res, fmt.Errorf("backfill %s: stopped at key %v (rerun to resume): %w", id, lastKey, err)
		}
		visited, changed, next, took, err := batchWithRetries(ctx, conn, ck, id, st, stored, lastKey, &size, o, log)
		if err != nil {
			recordError(ctx, conn, ck, id, err)
			return res, fmt.Errorf("backfill %s: batch after key %v: %w", id, lastKey, err)
		}
		if visited == 0 {
			break
		}
		res.Batches++
		res.RowsThisRun += changed
		res.RowsChanged += changed
		lastKey = next
		res.LastKey = next
		// Adapt the batch size to the target time, at most doubling or
		// halving at once.
		if took > 0 {
			f := float64(o.TargetBatchTime) / float64(took)
			f = max(0.5, min(2, f))
			size = max(10, min(o.MaxBatch, int(float64(size)*f)))
		}
		if o.MaxRowsPerSecond > 0 {
			size = min(size, max(1, int(o.MaxRowsPerSecond)))
			want := time.Duration(float64(res.RowsThisRun) / o.MaxRowsPerSecond * float64(time.Second))
			if ahead := want - time.Since(started); ahead > 0 {
				if err := sleep(ctx, ahead); err != nil {
					return res, fmt.Errorf("backfill %s: stopped at key %v (rerun to resume): %w", id, lastKey, err)
				}
			}
		}
		p.batch(visited, res, size, lastKey, log)
	}
	return finish(ctx, conn, ck, id, res, started, log)
}

// start records a new backfill: its bounds (the largest and smallest key
// now), an estimate of the rows, and an empty checkpoint.
func start(ctx context.Context, conn *pgx.Conn, ck string, t table, sp *spec, id string) error {
	var desc, asc []string
	var texts []string
	for _, k := range t.key {
		desc = append(desc, pgsql.Ident(k)+" DESC")
		asc = append(asc, pgsql.Ident(k))
		texts = append(texts, pgsql.Ident(k)+"::text")
	}
	q := `SELECT ARRAY[` + joinComma(texts) + `] FROM ` + t.name.Quoted() + ` ORDER BY `
	if err := conn.QueryRow(ctx, q+joinComma(desc)+` LIMIT 1`).Scan(&sp.UpperKey); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("backfill %s: read the largest key: %w", id, err)
	}
	if err := conn.QueryRow(ctx, q+joinComma(asc)+` LIMIT 1`).Scan(&sp.LowerKey); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return fmt.Errorf("backfill %s: read the smallest key: %w", id, err)
	}
	var est float64
	if err := conn.QueryRow(ctx, `SELECT greatest(reltuples, 0) FROM pg_class WHERE oid = to_regclass($1)`, t.name.Quoted()).Scan(&est); err != nil {
		return fmt.Errorf("backfill %s: estimate rows: %w", id, err)
	}
	sp.Estimate = int64(est)
	_, err := conn.Exec(ctx, `INSERT INTO `+ck+` (id, table_schema, table_name, spec) VALUES ($1, $2, $3, $4)
		ON CONFLICT (id) DO NOTHING`, id, t.name.Schema, t.name.Name, sp.marshal())
	if err != nil {
		return fmt.Errorf("backfill %s: record checkpoint: %w", id, err)
	}
	return nil
}

func joinComma(s []string) string {
	out := ""
	for i, x := range s {
		if i > 0 {
			out += ", "
		}
		out += x
	}
	return out
}

// batchWithRetries runs one batch in its own transaction, committing the
// checkpoint with it; lock timeouts, deadlocks and serialization failures
// are retried with backoff and jitter, each time with a halved batch.
func batchWithRetries(ctx context.Context, conn *pgx.Conn, ck, id string, st statements, sp spec, lastKey []string,
	size *int, o UpdateOptions, log zerolog.Logger) (visited, changed int64, next []string, took time.Duration, err error) {
	for attempt := 1; ; attempt++ {
		begin := time.Now()
		visited, changed, next, err = batch(ctx, conn, ck, id, st, sp, lastKey, *size, o.LockTimeout)
		took = time.Since(begin)
		if err == nil {
			return visited, changed, next, took, nil
		}
		if ctx.Err() != nil {
			return 0, 0, nil, took, ctx.Err()
		}
		if !pgsql.IsRetryable(err) {
			return 0, 0, nil, took, err
		}
		if attempt > o.Retries {
			return 0, 0, nil, took, fmt.Errorf("%w after %d attempts: %w", ErrRetriesExhausted, attempt, err)
		}
		*size = max(10, *size/2)
		log.Warn().Int("attempt", attempt).Int("batch_size", *size).Str("error", pgsql.Describe(err)).Msg("batch failed; retrying")
		d := min(10*time.Second, 100*time.Millisecond<<min(attempt-1, 10))
		if err := sleep(ctx, d/2+rand.N(d/2+1)); err != nil {
			return 0, 0, nil, took, err
		}
	}
}

func batch(ctx context.Context, conn *pgx.Conn, ck, id string, st statements, sp spec, lastKey []string,
	size int, lockTimeout time.Duration) (visited, changed int64, next []string, err error) {
	tx, err := conn.Begin(ctx)
	if err != nil {
		return 0, 0, nil, err
	}
	defer tx.Rollback(context.WithoutCancel(ctx))
	if err := pgsql.SetLocalLockTimeout(ctx, tx, lockTimeout); err != nil {
		return 0, 0, nil, err
	}
	args := []any{size}
	bounded := sp.OnlyNull == ""
	if bounded {
		for _, k := range sp.UpperKey {
			args = append(args, k)
		}
	}
	q := st.first
	if lastKey != nil {
		q = st.next
		for _, k := range lastKey {
			args = append(args, k)
		}
	}
	if err := tx.QueryRow(ctx, q, args...).Scan(&visited, &changed, &next); err != nil {
		return 0, 0, nil, err
	}
	if visited == 0 {
		return 0, 0, lastKey, tx.Commit(ctx)
	}
	if _, err := tx.Exec(ctx, `UPDATE `+ck+` SET last_key = $2, rows_changed = rows_changed + $3,
		error = NULL, updated_at = now() WHERE id = $1`, id, next, changed); err != nil {
		return 0, 0, nil, fmt.Errorf("checkpoint: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return 0, 0, nil, err
	}
	return visited, changed, next, nil
}

func finish(ctx context.Context, conn *pgx.Conn, ck, id string, res UpdateResult, started time.Time, log zerolog.Logger) (UpdateResult, error) {
	if _, err := conn.Exec(ctx, `UPDATE `+ck+` SET done = true, error = NULL, updated_at = now() WHERE id = $1`, id); err != nil {
		return res, fmt.Errorf("backfill %s: mark done: %w", id, err)
	}
	res.Took = time.Since(started)
	log.Info().Int64("rows_changed", res.RowsChanged).Int64("rows_this_run", res.RowsThisRun).Int("batches", res.Batches).
		Str("took", res.Took.Round(time.Millisecond).String()).Msg("backfill done")
	return res, nil
}

// recordError keeps why the backfill stopped in the catalog: the error as
// wrapped (e.g. "retries exhausted after 11 attempts: ..."), with
// PostgreSQL's detail and hint when it carries them.
func recordError(ctx context.Context, conn *pgx.Conn, ck, id string, err error) {
	rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	_, _ = conn.Exec(rctx, `UPDATE `+ck+` SET error = $2, updated_at = now() WHERE id = $1`, id, pgsql.DescribeWrapped(err))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}

// progress logs rows changed, rate and ETA every so often.
type progress struct {
	every    time.Duration
	last     time.Time
	start    time.Time
	visited  int64
	estimate int64
	// Integer single-column keys give a better ETA by key position.
	lo, hi, from float64
	byKey        bool
}

func newProgress(sp spec, lastKey []string, every time.Duration) *progress {
	p := &progress{every: every, last: time.Now(), start: time.Now(), estimate: sp.Estimate}
	if len(sp.LowerKey) == 1 && len(sp.UpperKey) == 1 {
		lo, err1 := strconv.ParseFloat(sp.LowerKey[0], 64)
		hi, err2 := strconv.ParseFloat(sp.UpperKey[0], 64)
		if err1 == nil && err2 == nil && hi > lo {
			p.lo, p.hi, p.from, p.byKey = lo, hi, lo, true
			if len(lastKey) == 1 {
				if f, err := strconv.ParseFloat(lastKey[0], 64); err == nil {
					p.from = f
				}
			}
		}
	}
	return p
}

func (p *progress) batch(visited int64, res UpdateResult, size int, lastKey []string, log zerolog.Logger) {
	p.visited += visited
	if time.Since(p.last) < p.every {
		return
	}
	p.last = time.Now()
	el := time.Since(p.start).Seconds()
	rate := float64(res.RowsThisRun) / el
	ev := log.Info().Int64("rows_changed", res.RowsChanged).Int64("rows_this_run", res.RowsThisRun).
		Int("batch_size", size).Strs("last_key", lastKey).Str("rate", fmt.Sprintf("%.0f rows/s", rate))
	switch {
	case p.byKey && len(lastKey) == 1:
		if cur, err := strconv.ParseFloat(lastKey[0], 64); err == nil && cur > p.from {
			frac := (cur - p.lo) / (p.hi - p.lo)
			eta := time.Duration(el * (p.hi - cur) / (cur - p.from) * float64(time.Second))
			ev = ev.Str("done", fmt.Sprintf("%.1f%%", 100*min(frac, 1))).Str("eta", eta.Round(time.Second).String())
		}
	case p.estimate > 0 && p.visited > 0:
		left := max(0, p.estimate-p.visited)
		ev = ev.Str("eta", time.Duration(float64(left)/(float64(p.visited)/el)*float64(time.Second)).Round(time.Second).String())
	}
	ev.Msg("backfill progress")
}
