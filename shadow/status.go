package shadow

import (
	"context"
	"encoding/json"
	"time"
)

// Status is the documented, stable JSON shape of `shadowctl status --json`
// (docs/status.md). Add fields; never rename or remove one.
type Status struct {
	ID            string          `json:"id"`
	Table         string          `json:"table"`
	GreenTable    string          `json:"green_table,omitempty"`
	Sync          string          `json:"sync"`
	Phase         string          `json:"phase"`
	Paused        bool            `json:"paused"`
	Serving       string          `json:"serving"`
	RowsCopied    int64           `json:"rows_copied"`
	RowsEstimated int64           `json:"rows_estimated"`
	ProgressPct   float64         `json:"progress_pct"`
	RowsPerSecond float64         `json:"rows_per_second"`
	ETASeconds    *float64        `json:"eta_seconds"`
	Verify        json.RawMessage `json:"verify"`
	LastCutover   *SwapRecord     `json:"last_cutover"`
	Error         string          `json:"error"`
	CreatedAt     time.Time       `json:"created_at"`
	PhaseSince    time.Time       `json:"phase_since"`
	CutOverAt     *time.Time      `json:"cut_over_at"`
	Alter         string          `json:"alter"`
	// Added for the daemon (issue 5).

	// Throttled says why the copy waits (null when it does not).
	Throttled *string `json:"throttled"`
	// Driver is the daemon that drives (or last drove) the migration.
	Driver           *DriverInfo `json:"driver"`
	BatchSize        int         `json:"batch_size"`
	MaxRowsPerSecond int         `json:"max_rows_per_second"`
	Workers          int         `json:"workers"`
	// SyncLagSeconds and SyncLagBytes: how far green trails blue (logical
	// sync; 0 and null for the synchronous trigger sync).
	SyncLagSeconds float64       `json:"sync_lag_seconds"`
	SyncLagBytes   *int64        `json:"sync_lag_bytes"`
	CutoverPolicy  string        `json:"cutover_policy"`
	CutoverHeld    bool          `json:"cutover_held"`
	CutoverWindow  *string       `json:"cutover_window"`
	NextWindow     *WindowStatus `json:"next_window"`
	AutoRollback   bool          `json:"auto_rollback"`
}

// WindowStatus is the current or next cutover window.
type WindowStatus struct {
	Start time.Time `json:"start"`
	End   time.Time `json:"end"`
	Open  bool      `json:"open"`
}

// Status is StatusOf with what only the database knows added: the logical
// sync's lag. Every place that shows a status (CLI, HTTP, metrics) uses it.
func (s *Store) Status(ctx context.Context, m *Migration, now time.Time) Status {
	st := StatusOf(m, now)
	if m.logical() {
		s.WithSyncLag(ctx, &st)
	}
	return st
}

// WithSyncLag fills the logical sync's lag from the catalog and the server.
func (s *Store) WithSyncLag(ctx context.Context, st *Status) {
	var bytes int64
	var secs float64
	err := s.Pool.QueryRow(ctx, `SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), applied_lsn)::bigint,
		CASE WHEN pg_wal_lsn_diff(pg_current_wal_lsn(), applied_lsn) > 1024 THEN extract(epoch FROM now() - coalesce(applied_at, updated_at)) ELSE 0 END::float8
		FROM `+s.Cat.T("sync_positions")+` WHERE migration_id = $1`, st.ID).Scan(&bytes, &secs)
	if err == nil {
		st.SyncLagBytes, st.SyncLagSeconds = &bytes, secs
	}
}

// StatusOf summarises a migration for people and programs.
func StatusOf(m *Migration, now time.Time) Status {
	s := Status{
		ID: m.ID, Table: m.Table.String(), Sync: string(m.Sync), Phase: string(m.Phase), Paused: m.Paused,
		Serving: m.State.Serving, RowsCopied: m.RowsCopied, RowsEstimated: m.RowsEstimated,
		Verify: m.Verify, LastCutover: m.State.LastCutover, Error: m.Error, CreatedAt: m.CreatedAt,
		PhaseSince: m.PhaseChangedAt, CutOverAt: m.CutOverAt, Alter: m.Request.Alter,
	}
	s.addDaemon(m, now)
	if s.Serving == "" {
		s.Serving = "blue"
	}
	if m.State.Plan != nil {
		s.GreenTable = m.State.Plan.Forward.Target.String()
	}
	if len(s.Verify) == 0 {
		s.Verify = json.RawMessage("null")
	}
	if m.RowsEstimated > 0 {
		s.ProgressPct = min(100, float64(m.RowsCopied)*100/float64(m.RowsEstimated))
	}
	if m.Phase == Copying {
		if el := now.Sub(m.PhaseChangedAt).Seconds(); el > 0 {
			s.RowsPerSecond = float64(m.RowsCopied) / el
			if s.RowsPerSecond > 0 && m.RowsEstimated > m.RowsCopied {
				eta := float64(m.RowsEstimated-m.RowsCopied) / s.RowsPerSecond
				s.ETASeconds = &eta
			}
		}
	} else if chainIndex(m.Phase) > chainIndex(Copying) || !m.Phase.BeforeCutover() {
		s.ProgressPct = 100
	}
	return s
}
