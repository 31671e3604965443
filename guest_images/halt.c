/* halt: stop with interrupts off and without the debug exit, so the VMM
 * must notice a vCPU that can never wake up again. */
#include "runtime.h"

int main(struct hvm_start_info *si)
{
    (void)si;
    puts("halting");
    for (;;) {
        cli();
        hlt();
    }
}
