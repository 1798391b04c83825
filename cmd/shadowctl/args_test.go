package main

import (
	"slices"
	"testing"
)

func TestInterspersedFlagsAfterArguments(t *testing.T) {
	app := newApp()
	for _, c := range []struct{ in, want []string }{
		{[]string{"shadowctl", "--dsn", "x", "cutover", "m1", "--lock-timeout", "100ms"},
			[]string{"shadowctl", "--dsn", "x", "cutover", "--lock-timeout", "100ms", "m1"}},
		{[]string{"shadowctl", "status", "m1", "--json"}, []string{"shadowctl", "status", "--json", "m1"}},
		{[]string{"shadowctl", "finalize", "m1", "--force", "--min-soak=1s"}, []string{"shadowctl", "finalize", "--force", "--min-soak=1s", "m1"}},
		{[]string{"shadowctl", "lock", "--wait", "1s", "--", "sh", "-c", "exit 3"}, []string{"shadowctl", "lock", "--wait", "1s", "--", "sh", "-c", "exit 3"}},
		{[]string{"shadowctl", "lock", "sh", "-c", "exit 3"}, []string{"shadowctl", "lock", "sh", "-c", "exit 3"}},
	} {
		if got := interspersed(app, c.in); !slices.Equal(got, c.want) {
			t.Errorf("interspersed(%q) = %q, want %q", c.in, got, c.want)
		}
	}
}

// Every command name is registered once (urfave/cli refuses to run otherwise).
func TestCommandNamesAreUnique(t *testing.T) {
	seen := map[string]bool{}
	for _, c := range newApp().Commands {
		for _, n := range c.Names() {
			if seen[n] {
				t.Errorf("command name %q is registered twice", n)
			}
			seen[n] = true
		}
	}
}
