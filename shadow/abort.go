package shadow

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/pgsql"
	"github.com/shadowctl/shadowctl/sync"
)

// Abort removes everything the migration created and marks it aborted. It is
// allowed while blue serves (before the cutover, or after a rollback) and
// after a failure there; it can be repeated after an interruption.
func (r *Runner) Abort(ctx context.Context, id, reason string) error {
	if reason == "" {
		reason = "aborted by the operator"
	}
	return r.abort(ctx, id, reason, nil)
}

// abort does the work; held is the caller's claim when it drives the
// migration itself (nil: stop the driver and take the claim).
func (r *Runner) abort(ctx context.Context, id, reason string, held *claimHandle) error {
	m, err := r.Store.Get(ctx, r.Pool, id)
	if err != nil {
		return err
	}
	switch {
	case m.Phase == Aborted:
		return nil
	case m.Phase == Finalized:
		return fmt.Errorf("migration %s is finalized: %w (nothing to abort)", id, ErrWrongPhase)
	case m.State.Serving == "green" || m.Phase == CutOver || m.Phase == CuttingOver || m.Phase == Finalizing || m.Phase == RollingBack:
		return fmt.Errorf("migration %s is %s and green may serve the application: %w (run `shadowctl rollback %s` first)", id, m.Phase, ErrWrongPhase, id)
	}
	if m.Phase != Aborting {
		from := []Phase{Pending, Preparing, Copying, Verifying, Ready, RolledBack, Failed}
		if err := r.Store.SetPhase(ctx, r.Pool, id, from, Aborting, reason); err != nil {
			return err
		}
	}
	if held == nil {
		// The driver sees the phase change at its next batch and lets go.
		c, err := r.claim(ctx, id, 2*time.Minute)
		if err != nil {
			return fmt.Errorf("abort %s: the driving process did not stop: %w", id, err)
		}
		defer c.release()
	}
	if m, err = r.Store.Get(ctx, r.Pool, id); err != nil {
		return err
	}
	if err := r.removeObjects(ctx, m); err != nil {
		_ = r.Store.SetError(ctx, id, "abort incomplete: "+err.Error())
		return fmt.Errorf("abort %s: %w (run abort again)", id, err)
	}
	return pgx.BeginFunc(ctx, r.Pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `DELETE FROM `+r.Store.Cat.T("copy_ranges")+` WHERE migration_id = $1`, id); err != nil {
			return err
		}
		return r.Store.SetPhase(ctx, tx, id, []Phase{Aborting}, Aborted, reason)
	})
}

// removeObjects drops the sync and green. Each statement tolerates objects
// that are already gone, so an interrupted removal can be repeated.
func (r *Runner) removeObjects(ctx context.Context, m *Migration) error {
	p := m.State.Plan
	if p == nil {
		return nil // prepare never committed: nothing exists
	}
	if m.Sync == SyncLogical {
		if err := r.removeLogical(ctx, m, slotNameFor(p)); err != nil {
			return err
		}
	}
	fwd := r.forwardSync(m)
	if err := r.withShortLock(ctx, m, "remove the sync triggers from "+m.Table.String(), func(tx pgx.Tx) error {
		return sync.Exec(ctx, tx, fwd.DropTriggersSQL())
	}); err != nil {
		return err
	}
	green := p.Forward.Target
	if err := r.withShortLock(ctx, m, "drop green "+green.String(), func(tx pgx.Tx) error {
		return sync.Exec(ctx, tx, append(r.reverseSync(m).DropSQL(), "DROP TABLE IF EXISTS "+green.Quoted()))
	}); err != nil {
		return err
	}
	if err := sync.Exec(ctx, r.Pool, fwd.DropFunctionsSQL()); err != nil {
		return err
	}
	return r.dropGreenSchemaIfEmpty(ctx, m)
}

// dropGreenSchemaIfEmpty removes the green schema when this migration created
// it and nothing else lives there now.
func (r *Runner) dropGreenSchemaIfEmpty(ctx context.Context, m *Migration) error {
	if !m.State.CreatedGreenSchema {
		return nil
	}
	_, err := r.Pool.Exec(ctx, "DROP SCHEMA IF EXISTS "+pgsql.Ident(m.GreenSchema))
	if pgsql.Code(err) == "2BP01" { // dependent objects: someone else uses it
		return nil
	}
	return err
}
