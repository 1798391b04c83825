package shadow

import (
	"context"
	"fmt"

	"github.com/shadowctl/shadowctl/cutover"
	"github.com/shadowctl/shadowctl/internal/pgsql"
)

// VerifyServing verifies a cut-over migration: green (which serves) against
// the reverse-synced blue under its parked name, through the forward
// mapping, without repair (after the cutover green is the truth the
// application writes; a difference is reported, never patched). The result
// is recorded as the migration's last verification.
func (r *Runner) VerifyServing(ctx context.Context, id string) (cutover.VerifyResult, error) {
	m, err := r.Store.Get(ctx, r.Pool, id)
	if err != nil {
		return cutover.VerifyResult{}, err
	}
	if m.Phase != CutOver || m.State.Plan == nil {
		return cutover.VerifyResult{}, fmt.Errorf("migration %s is %s; verification after the cutover needs cut_over: %w", id, m.Phase, ErrWrongPhase)
	}
	v := r.verifier(m)
	v.Repair = false
	v.Mapping.Source = pgsql.QualifiedName{Schema: m.Table.Schema, Name: m.State.Plan.Names.ParkedBlue}
	res, err := v.Run(ctx)
	if serr := r.Store.SaveVerify(ctx, r.Pool, id, res); serr != nil && err == nil {
		err = serr
	}
	return res, err
}
