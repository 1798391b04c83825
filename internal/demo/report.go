package demo

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// Print writes the report for people.
func (r *Report) Print(w io.Writer) {
	line := strings.Repeat("─", 78)
	fmt.Fprintf(w, "\n%s\nshadowctl demo — report\n%s\n", line, line)
	fmt.Fprintf(w, "seed:        %d orders in %s\n", r.SeedRows, round(r.SeedTook))
	fmt.Fprintf(w, "migration:   %s — public.orders: %s, customer_email = %s\n", r.MigrationID, scenarioAlter, emailMapping)
	fmt.Fprintf(w, "rows copied: %d; verification: %d rows in %d chunks, %d mismatched, %d repaired, ok=%v (%.1f s)\n",
		r.RowsCopied, r.Verify.Rows, r.Verify.Chunks, r.Verify.Mismatched, r.Verify.Repaired, r.Verify.OK, r.Verify.Seconds)

	fmt.Fprintln(w, "\ntime per step:")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	for _, s := range r.Steps {
		fmt.Fprintf(tw, "  %s\t%s\n", s.Name, round(s.Took))
	}
	tw.Flush()

	fmt.Fprintln(w, "\nswaps (lock wait/hold from the catalog; client latency measured by the load):")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  swap\tattempts\tlock wait\tlock held\ttook\tclient ops\terrors\tmax client latency\t")
	for _, s := range r.Swaps {
		fmt.Fprintf(tw, "  %s\t%d\t%.1f ms\t%.1f ms\t%s\t%d\t%d\t%s\t\n", s.Kind, s.Attempts, s.LockWaitMS, s.LockHoldMS, round(s.Took),
			s.Load.Ops(), s.Load.Errors(), ms(s.Load.MaxLatency()))
	}
	tw.Flush()

	fmt.Fprintln(w, "\nclient load per phase:")
	tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "  phase\ttime\tops\tops/s\terrors\tmax latency\tslowest op\t")
	for _, p := range r.LoadPhases {
		fmt.Fprintf(tw, "  %s\t%s\t%d\t%.0f\t%d\t%s\t%s\t\n", p.Name, round(p.Duration()), p.Ops(), p.TPS(), p.Errors(), ms(p.MaxLatency()), p.SlowestOp())
	}
	fmt.Fprintf(tw, "  total\t\t%d\t\t%d\t\t\t\n", r.Ops, r.Errors)
	tw.Flush()
	for _, e := range r.ErrorSamples {
		fmt.Fprintf(w, "  error: %s\n", e)
	}

	fmt.Fprintf(w, "\nfinal state: %s\n", r.Check.Summary())
	fmt.Fprintf(w, "  customer_email: %d rows NULL (inserted through the view over green, which the load does not know about),\n"+
		"  %d rows written while a swap was in flight (NULL or the customer's email both correct), the rest the customer's email\n",
		r.Check.EmailNull, r.Check.EmailEither)
	if len(r.Leftovers) == 0 {
		fmt.Fprintln(w, "leftovers:   none (no sync triggers or functions, no green schema, no parked blue)")
	} else {
		fmt.Fprintf(w, "leftovers:   %s\n", strings.Join(r.Leftovers, ", "))
	}
	fmt.Fprintf(w, "\n%s", r.Definition)
	fmt.Fprintf(w, "\nclient errors: %d   final table %s   total %s\n", r.Errors,
		map[bool]string{true: "== the load's model", false: "!= the load's model"}[r.Check.OK()], round(r.Total))
	fmt.Fprintln(w, "(the load uses pgx QueryExecModeExec: with a server-side prepared-statement cache, a cached plan whose\n"+
		" result type changes — amount float8 → numeric — fails once per connection after a swap with\n"+
		" \"cached plan must not change result type\", a documented PostgreSQL limit)")
	fmt.Fprintln(w, line)
}

func ms(d time.Duration) string { return fmt.Sprintf("%.1f ms", float64(d.Microseconds())/1000) }
