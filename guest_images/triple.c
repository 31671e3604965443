/* triple: end the run with a CPU shutdown (triple fault), for the VMM's
 * "guest triple-faulted" path. */
#include "runtime.h"

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("about to triple-fault");
    triple_fault();
}
