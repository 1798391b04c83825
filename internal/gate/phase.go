package gate

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"github.com/jackc/pgx/v5"
	"github.com/shadowctl/shadowctl/internal/catalog"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// Lifecycle is the forward order of a migration's phases.
var Lifecycle = []string{"pending", "preparing", "copying", "verifying", "ready",
	"cutting_over", "cut_over", "finalizing", "finalized"}

// Phases one can wait for: the lifecycle and the rollback branch.
var waitable = append(slices.Clone(Lifecycle), "rolling_back", "rolled_back")

// Failed phases: a migration in one never reaches anything.
var failedPhases = []string{"failed", "aborting", "aborted"}

// Verdict is where a migration stands against a wanted phase.
type Verdict int

const (
	NotYet  Verdict = iota // may still get there
	Reached                // there or past it
	Failed                 // failed, aborting or aborted (or missing): it will not
)

// ValidatePhase refuses phases one cannot wait for.
func ValidatePhase(want string) error {
	if slices.Contains(waitable, want) {
		return nil
	}
	if slices.Contains(failedPhases, want) {
		return fmt.Errorf("%q: a failed or aborted migration never satisfies a gate: %w", want, ErrUnknownPhase)
	}
	return fmt.Errorf("%q (want one of %v): %w", want, waitable, ErrUnknownPhase)
}

// Evaluate decides whether a migration in phase current has reached want.
//
// Along the lifecycle, a phase is reached when the migration is in it or in a
// later one (cut_over satisfies ready; finalized satisfies cut_over). The
// rollback branch counts as ready, not beyond: rolling_back and rolled_back
// satisfy pending..ready (green is verified and kept current) but not
// cutting_over or later (the application is back on blue). --phase
// rolling_back is reached by rolling_back or rolled_back; --phase rolled_back
// only by rolled_back. failed, aborting and aborted satisfy nothing.
func Evaluate(current, want string) Verdict {
	if slices.Contains(failedPhases, current) {
		return Failed
	}
	switch want {
	case "rolling_back":
		if current == "rolling_back" || current == "rolled_back" {
			return Reached
		}
		return NotYet
	case "rolled_back":
		if current == "rolled_back" {
			return Reached
		}
		return NotYet
	}
	w := slices.Index(Lifecycle, want)
	c := slices.Index(Lifecycle, current)
	if current == "rolling_back" || current == "rolled_back" {
		c = slices.Index(Lifecycle, "ready")
	}
	if w < 0 || c < 0 {
		return NotYet // an unknown (newer) phase: keep waiting rather than guess
	}
	if c >= w {
		return Reached
	}
	return NotYet
}

// MigrationState is the part of a migration the gate reads.
type MigrationState struct {
	Found  bool
	Phase  string
	Paused bool
	Error  string
}

// ReadMigration reads a migration's phase; a missing catalog reads as a
// missing migration.
func ReadMigration(ctx context.Context, q pgsql.Querier, cat catalog.Catalog, id string) (MigrationState, error) {
	var s MigrationState
	err := q.QueryRow(ctx, `SELECT phase, paused, coalesce(error, '') FROM `+cat.T("migrations")+` WHERE id = $1`, id).
		Scan(&s.Phase, &s.Paused, &s.Error)
	switch {
	case errors.Is(err, pgx.ErrNoRows), pgsql.Code(err) == pgsql.CodeUndefinedTable, pgsql.Code(err) == "3F000":
		return s, nil
	case err != nil:
		return s, fmt.Errorf("read migration %s: %w", id, err)
	}
	s.Found = true
	return s, nil
}

// Judge turns a migration's state into a verdict and a one-line reason.
func Judge(id, want string, s MigrationState) (Verdict, string) {
	if !s.Found {
		return Failed, fmt.Sprintf("migration %s does not exist", id)
	}
	v := Evaluate(s.Phase, want)
	paused := ""
	if s.Paused {
		paused = " (paused)"
	}
	switch v {
	case Reached:
		return v, fmt.Sprintf("migration %s is %s%s: phase %s reached", id, s.Phase, paused, want)
	case Failed:
		msg := fmt.Sprintf("migration %s is %s: it will not reach %s", id, s.Phase, want)
		if s.Error != "" {
			msg += ": " + s.Error
		}
		return v, msg
	}
	return v, fmt.Sprintf("migration %s is %s%s: phase %s not reached yet", id, s.Phase, paused, want)
}

// CheckMigration passes when the migration has reached want.
func CheckMigration(ctx context.Context, q pgsql.Querier, cat catalog.Catalog, id, want string) (Result, Verdict, error) {
	if err := ValidatePhase(want); err != nil {
		return Result{}, Failed, err
	}
	s, err := ReadMigration(ctx, q, cat, id)
	if err != nil {
		return Result{}, Failed, err
	}
	v, reason := Judge(id, want, s)
	return Result{OK: v == Reached, Reason: reason}, v, nil
}
