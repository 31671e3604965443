/* exitcode: prove the debug-exit status reaches the host (42). */
#include "runtime.h"

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("exiting with status 42");
    exit(42);
}
