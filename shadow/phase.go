// Package shadow owns a blue-green migration: the operator's request, the
// plan derived from it (green's definition and the row mappings both ways),
// the phases and their persisted state in the catalog, and the runner that
// drives a migration from one phase to the next. The copy, the sync, the
// verification and the swap themselves live in backfill, sync and cutover;
// this package decides when each runs and records what happened.
package shadow

import "fmt"

// Phase is where a migration is in its lifecycle. The names are part of the
// interface (status --json, check, wait): never rename one.
type Phase string

// The lifecycle (see DESIGN.md §1).
const (
	Pending     Phase = "pending"
	Preparing   Phase = "preparing"
	Copying     Phase = "copying"
	Verifying   Phase = "verifying"
	Ready       Phase = "ready"
	CuttingOver Phase = "cutting_over"
	CutOver     Phase = "cut_over"
	Finalizing  Phase = "finalizing"
	Finalized   Phase = "finalized"
	RollingBack Phase = "rolling_back"
	RolledBack  Phase = "rolled_back"
	Aborting    Phase = "aborting"
	Aborted     Phase = "aborted"
	Failed      Phase = "failed"
)

// AllPhases lists every phase in lifecycle order.
var AllPhases = []Phase{Pending, Preparing, Copying, Verifying, Ready, CuttingOver, CutOver,
	Finalizing, Finalized, RollingBack, RolledBack, Aborting, Aborted, Failed}

// ParsePhase checks a phase name.
func ParsePhase(s string) (Phase, error) {
	for _, p := range AllPhases {
		if string(p) == s {
			return p, nil
		}
	}
	return "", fmt.Errorf("unknown phase %q (one of %v)", s, AllPhases)
}

// Terminal reports whether nothing more happens to the migration.
func (p Phase) Terminal() bool { return p == Aborted || p == Finalized }

// BeforeCutover reports whether blue still serves and green was never seen by
// the application: abort may remove everything.
func (p Phase) BeforeCutover() bool {
	switch p {
	case Pending, Preparing, Copying, Verifying, Ready, RolledBack:
		return true
	}
	return false
}
