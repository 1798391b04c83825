package daemon

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/shadowctl/shadowctl/shadow"
)

// metrics are the daemon's Prometheus metrics, on a registry of its own.
type metrics struct {
	reg             *prometheus.Registry
	rowsCopied      *prometheus.GaugeVec
	rowsEstimated   *prometheus.GaugeVec
	rowsPerSecond   *prometheus.GaugeVec
	phase           *prometheus.GaugeVec
	paused          *prometheus.GaugeVec
	throttled       *prometheus.GaugeVec
	syncLag         *prometheus.GaugeVec
	batchRows       *prometheus.CounterVec
	verifications   *prometheus.CounterVec
	cutoverAttempts *prometheus.CounterVec
	lockAttempts    *prometheus.CounterVec
	hooks           *prometheus.CounterVec
	lockWait        *prometheus.HistogramVec
	lockHold        *prometheus.HistogramVec
	driving         prometheus.Gauge
}

func newMetrics() *metrics {
	mig := []string{"migration"}
	lockBuckets := []float64{.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10}
	m := &metrics{
		reg:             prometheus.NewRegistry(),
		rowsCopied:      prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_rows_copied", Help: "Rows copied from blue to green (from the catalog's checkpoints)."}, mig),
		rowsEstimated:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_rows_estimated", Help: "Estimated rows of blue when the migration was submitted."}, mig),
		rowsPerSecond:   prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_copy_rows_per_second", Help: "Average copy rate of the current copy phase."}, mig),
		phase:           prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_migration_phase", Help: "1 for the migration's current phase, 0 for the others."}, []string{"migration", "phase"}),
		paused:          prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_migration_paused", Help: "1 while the migration is paused."}, mig),
		throttled:       prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_migration_throttled", Help: "1 while the copy waits for a throttle condition."}, mig),
		syncLag:         prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "shadowctl_sync_lag_seconds", Help: "How far green is behind blue (0 for the synchronous trigger sync)."}, mig),
		batchRows:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shadowctl_copy_batch_rows_total", Help: "Rows copied by this daemon's copy batches."}, mig),
		verifications:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shadowctl_verifications_total", Help: "Verifications after the cutover run by this daemon, by result (ok, mismatch, error)."}, []string{"migration", "result"}),
		cutoverAttempts: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shadowctl_cutover_attempts_total", Help: "Automatic cutovers tried by this daemon, by result (ok, failed, vetoed)."}, []string{"migration", "result"}),
		lockAttempts:    prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shadowctl_cutover_lock_timeouts_total", Help: "Swap attempts whose lock was not granted within lock_timeout."}, mig),
		hooks:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: "shadowctl_hooks_total", Help: "Hook commands run, by event and success."}, []string{"event", "ok"}),
		lockWait:        prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "shadowctl_swap_lock_wait_seconds", Help: "Time the swap waited for its locks (successful swaps).", Buckets: lockBuckets}, []string{"kind"}),
		lockHold:        prometheus.NewHistogramVec(prometheus.HistogramOpts{Name: "shadowctl_swap_lock_hold_seconds", Help: "Time the swap held its locks.", Buckets: lockBuckets}, []string{"kind"}),
		driving:         prometheus.NewGauge(prometheus.GaugeOpts{Name: "shadowctl_daemon_driving", Help: "Migrations this daemon drives now."}),
	}
	m.reg.MustRegister(m.rowsCopied, m.rowsEstimated, m.rowsPerSecond, m.phase, m.paused, m.throttled, m.syncLag,
		m.batchRows, m.verifications, m.cutoverAttempts, m.lockAttempts, m.hooks, m.lockWait, m.lockHold, m.driving)
	// The histograms appear (empty) before the first swap.
	for _, k := range []string{"cutover", "rollback"} {
		m.lockWait.WithLabelValues(k)
		m.lockHold.WithLabelValues(k)
	}
	return m
}

// observe sets the gauges from a catalog scan; finished migrations leave.
func (m *metrics) observe(ms []*shadow.Migration, now time.Time, status func(*shadow.Migration, time.Time) shadow.Status) {
	for _, mg := range ms {
		if mg.Phase.Terminal() {
			for _, g := range []*prometheus.GaugeVec{m.rowsCopied, m.rowsEstimated, m.rowsPerSecond, m.paused, m.throttled, m.syncLag} {
				g.DeleteLabelValues(mg.ID)
			}
			m.phase.DeletePartialMatch(prometheus.Labels{"migration": mg.ID})
			continue
		}
		s := status(mg, now)
		m.rowsCopied.WithLabelValues(mg.ID).Set(float64(s.RowsCopied))
		m.rowsEstimated.WithLabelValues(mg.ID).Set(float64(s.RowsEstimated))
		m.rowsPerSecond.WithLabelValues(mg.ID).Set(s.RowsPerSecond)
		m.syncLag.WithLabelValues(mg.ID).Set(s.SyncLagSeconds)
		m.paused.WithLabelValues(mg.ID).Set(b2f(s.Paused))
		m.throttled.WithLabelValues(mg.ID).Set(b2f(s.Throttled != nil))
		for _, p := range shadow.AllPhases {
			m.phase.WithLabelValues(mg.ID, string(p)).Set(b2f(p == mg.Phase))
		}
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
